"""The experts of a mixture-of-experts model in the roofline: parameters total and active per
token, and the MLP operator of a step, which reads only the experts its tokens chose."""

from __future__ import annotations

from tuili.models.config import ModelConfig


def sparse_layers(c: ModelConfig) -> int:
    return sum(c.moe.is_sparse(i) for i in range(c.num_layers)) if c.moe else 0


def expected_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """Distinct experts a step of `tokens` tokens reads, routing uniform and independent: each
    expert is missed by a token with probability 1 - k/E."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def expert_params(c: ModelConfig) -> dict[str, int]:
    """Per sparse layer: one routed expert's, the shared expert's and the router's parameters."""
    m, h = c.moe, c.hidden_size
    shared = 3 * h * m.shared_intermediate_size + (h if m.shared_intermediate_size else 0)
    return {"expert": 3 * h * m.expert_intermediate_size, "shared": shared,
            "router": h * m.num_experts}


def mlp_params(c: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of all layers' MLPs."""
    dense = 3 * c.hidden_size * c.intermediate_size * (c.num_layers - sparse_layers(c))
    if not c.moe:
        return dense, dense
    p, sparse = expert_params(c), sparse_layers(c)
    fixed = p["shared"] + p["router"]
    total = dense + sparse * (c.moe.num_experts * p["expert"] + fixed)
    active = dense + sparse * (c.moe.top_k * p["expert"] + fixed)
    return total, active


def mlp_step(c: ModelConfig, tokens: int) -> tuple[float, float, int, int]:
    """(FLOPs, weight parameters read, activation values read, written) of one step's MLPs, all
    layers: dense layers as usual; sparse ones route each token through top_k experts and read
    the experts some token chose (expected_experts) once each."""
    h, dense_inter = c.hidden_size, c.intermediate_size
    dense_layers = c.num_layers - sparse_layers(c)
    flops = 2.0 * tokens * 3 * h * dense_inter * dense_layers
    params = 3.0 * h * dense_inter * dense_layers
    # gate/up: h in, 2 * inter out; down: inter in, h out
    act_in = tokens * (h + dense_inter) * dense_layers
    act_out = tokens * (2 * dense_inter + h) * dense_layers
    if c.moe:
        m, p, sparse = c.moe, expert_params(c), sparse_layers(c)
        inter, shared = m.expert_intermediate_size, m.shared_intermediate_size
        flops += 2.0 * tokens * (m.top_k * p["expert"] + p["shared"] + p["router"]) * sparse
        params += (expected_experts(tokens, m.num_experts, m.top_k) * p["expert"]
                   + p["shared"] + p["router"]) * sparse
        act_in += tokens * (h + m.top_k * (h + inter) + (2 * h + shared if shared else 0)) * sparse
        act_out += tokens * (m.num_experts + m.top_k * (2 * inter + h)
                             + (2 * shared + h + 1 if shared else 0)) * sparse
    return flops, params, act_in, act_out
