"""Request bodies of the pooling endpoints (strict types, as protocol.py's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class EmbeddingRequest(_Body):
    """OpenAI's POST /v1/embeddings."""
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class RerankDocument(_Body):
    text: str


class RerankRequest(_Body):
    """Cohere's / Jina's POST /v1/rerank."""
    model: str | None = None
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = None
    return_documents: bool = True


class ScoreRequest(_Body):
    """vLLM's POST /v1/score: text_1 against each of text_2, or pairwise."""
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
