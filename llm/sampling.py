"""Image-code sampling: classifier-free guidance at every depth step, top-k / top-p, temperature.

The LLM steps over the N image positions; at each, the depth transformer samples the L_pix codes one
depth at a time; the next LLM input is gen_projector(sum of those code vectors). With ``cache=True`` the
LLM keeps a KV cache across positions and the depth transformer one across depths; ``cache=False``
re-runs both prefixes every step (the reference the cached path must match exactly). Each sample draws
its uniforms from its own generator, so results do not depend on batch composition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm.config import SamplerConfig


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits (M, K) float32 with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (M, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p (always >= 1)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(logits: Tensor, temperature: float, u: Tensor) -> Tensor:
    """Inverse-CDF draw: logits (M, K), uniforms u (M,) -> indices (M,) (argmax at temperature 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)  # (M, K)
    idx = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp(max=logits.shape[-1] - 1)


def _uniforms(gens: list[torch.Generator]) -> Tensor:
    return torch.cat([torch.rand(1, generator=g) for g in gens])  # (B,)


@torch.no_grad()
def sample_codes(model, prompts: list[list[int]], uncond: list[int] | None, sampler: SamplerConfig,
                 gens: list[torch.Generator], cache: bool = True) -> Tensor:
    """Token-id prompts (each ending in ``<im_start>``) -> codes (B, N, L_pix). ``uncond`` (the empty-prompt
    ids) is batched after the conditional rows when ``sampler.cfg_scale != 1``."""
    dev = model.codebooks.device
    B, N = len(prompts), model.image_positions
    guided = uncond is not None and sampler.cfg_scale != 1.0
    rows = prompts + ([uncond] * B if guided else [])
    P = max(len(r) for r in rows)
    pad = model.dims.token_ids["pad"]
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=dev)  # (M, P), left padded
    am = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=dev)  # (M, P)
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # (M, P)
    emb = model.llm.get_input_embeddings()(ids)  # (M, P, H)
    out = model.hidden_states(emb, am, position_ids=pos, use_cache=cache)
    h, past = out.last_hidden_state[:, -1], out.past_key_values  # (M, H)
    codes = []
    for t in range(N):
        k = _depth_sample(model, h, B, guided, sampler, gens, cache)  # (B, L)
        codes.append(k)
        x = model.gen_inputs(torch.cat([k, k]) if guided else k, position=t).unsqueeze(1).to(emb.dtype)  # (M, 1, H)
        am = torch.cat([am, am.new_ones(len(rows), 1)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        if t == N - 1:
            break
        if cache:
            out = model.hidden_states(x, am, position_ids=pos[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            emb = torch.cat([emb, x], 1)  # (M, P + t + 1, H)
            out = model.hidden_states(emb, am, position_ids=pos, use_cache=False)
        h = out.last_hidden_state[:, -1]
    return torch.stack(codes, 1)  # (B, N, L)


def _depth_sample(model, h: Tensor, B: int, guided: bool, sampler: SamplerConfig, gens: list[torch.Generator],
                  cache: bool) -> Tensor:
    """The L_pix codes of one position for every sample: h (M, H) -> (B, L)."""
    depth, L = model.depth, model.dims.depth_pix
    kv, cums, out = None, [], []
    for d in range(L):
        if cache:
            x = depth.slot_input(d, h=h) if d == 0 else depth.slot_input(d, cum_e=cums[-1])
            logits, kv = depth.step(x, d, kv)  # (M, K)
        else:
            prefix = torch.stack(cums, 1) if cums else h.new_zeros(h.shape[0], 0, model.dims.code_dim)
            logits = depth.prefix_logits(h, prefix)  # (M, K)
        logits = logits.float()
        if guided:
            cond, unc = logits[:B], logits[B:]
            logits = unc + sampler.cfg_scale * (cond - unc)  # (B, K)
        k = draw(filter_logits(logits, sampler.top_k, sampler.top_p), sampler.temperature, _uniforms(gens).to(h.device))
        out.append(k)
        e = model.codebooks[d][torch.cat([k, k]) if guided else k].to(h.dtype)  # (M, D)
        cums.append(e if not cums else cums[-1] + e)
    return torch.stack(out, -1)  # (B, L)
