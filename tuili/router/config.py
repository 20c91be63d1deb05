"""The router's configuration: model names, each with versions (a weight and the workers that
serve it), read from a YAML file or built from a list of worker URLs, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tuili.errors import InvalidParameter


@dataclass(frozen=True)
class Version:
    name: str
    weight: float
    workers: tuple[str, ...]  # base URLs, e.g. http://10.0.0.5:8000


@dataclass(frozen=True)
class ModelRoute:
    name: str  # what clients send as `model`
    versions: tuple[Version, ...]


@dataclass
class RouterConfig:
    models: dict[str, ModelRoute] = field(default_factory=dict)
    discover: tuple[str, ...] = ()  # workers whose served models become routes (--worker)
    worker_api_key: str | None = None  # sent to the workers as a Bearer token
    health_interval: float = 1.0  # seconds between polls of each worker's /health and /metrics
    prefix_chars: int = 256  # prompt prefixes are matched in chunks of this many characters
    max_prefix_chunks: int = 64  # the first chunks only: affinity is about shared heads

    @property
    def workers(self) -> list[str]:
        urls = dict.fromkeys(self.discover)
        for route in self.models.values():
            for version in route.versions:
                urls.update(dict.fromkeys(version.workers))
        return list(urls)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RouterConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidParameter("config", f"cannot read {path}: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> RouterConfig:
        if not isinstance(data, dict):
            raise InvalidParameter(where, "must be a mapping with a 'models' key")
        unknown = set(data) - {"models", "workers", "worker_api_key", "health_interval",
                               "prefix_chars", "max_prefix_chunks"}
        if unknown:
            raise InvalidParameter(where, f"unknown keys {sorted(unknown)}")
        models = {name: _route(name, spec, f"{where}: models.{name}")
                  for name, spec in (data.get("models") or {}).items()}
        config = cls(models=models, discover=tuple(_url(u, f"{where}: workers")
                                                    for u in data.get("workers") or ()),
                     worker_api_key=data.get("worker_api_key"),
                     health_interval=float(data.get("health_interval", 1.0)),
                     prefix_chars=int(data.get("prefix_chars", 256)),
                     max_prefix_chunks=int(data.get("max_prefix_chunks", 64)))
        return config.validate(where)

    def validate(self, where: str = "config") -> RouterConfig:
        if not self.models and not self.discover:
            raise InvalidParameter(where, "names no models and no workers; give 'models' (or "
                                          "--config) or 'workers' (or --worker URL)")
        if self.health_interval <= 0:
            raise InvalidParameter("health_interval", f"got {self.health_interval}, must be > 0")
        if self.prefix_chars < 1 or self.max_prefix_chunks < 1:
            raise InvalidParameter("prefix_chars", "prefix_chars and max_prefix_chunks must be "
                                                   ">= 1")
        return self


def _route(name: str, spec, where: str) -> ModelRoute:
    if isinstance(spec, dict) and "workers" in spec and "versions" not in spec:
        spec = {"versions": [{"name": "default", "weight": 1, "workers": spec["workers"]}]}
    if not isinstance(spec, dict) or not isinstance(spec.get("versions"), list) \
            or not spec["versions"]:
        raise InvalidParameter(where, "needs 'workers: [URL, ...]' or 'versions: [{name, weight, "
                                      "workers}, ...]'")
    versions, seen = [], set()
    for i, v in enumerate(spec["versions"]):
        at = f"{where}.versions[{i}]"
        if not isinstance(v, dict) or not v.get("workers"):
            raise InvalidParameter(at, "needs 'workers: [URL, ...]'")
        vname = str(v.get("name", f"v{i + 1}"))
        if vname in seen:
            raise InvalidParameter(at, f"version name {vname!r} appears twice")
        seen.add(vname)
        weight = v.get("weight", 1)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise InvalidParameter(f"{at}.weight", f"got {weight!r}, must be a number >= 0")
        versions.append(Version(vname, float(weight),
                                tuple(_url(u, f"{at}.workers") for u in v["workers"])))
    if not any(v.weight > 0 for v in versions):
        raise InvalidParameter(where, "every version has weight 0; give one a weight > 0")
    return ModelRoute(name, tuple(versions))


def _url(url, where: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InvalidParameter(where, f"got {url!r}; a worker is an http(s):// URL")
    return url.rstrip("/")
