"""An independent float64 numpy Llama forward pass (Meta's complex-number RoPE, repeat_kv), for tests."""
import numpy as np


def rmsnorm(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_complex(x, angles):
  """x [T, heads, hd] in interleaved pairs; angles [T, hd/2]."""
  T, h, hd = x.shape
  z = x.reshape(T, h, hd // 2, 2)
  z = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * angles)[:, None, :]
  return np.stack([z.real, z.imag], -1).reshape(T, h, hd)


def forward(w: dict, args, tokens, angles=None, attn_scale=1.0, hidden=False) -> np.ndarray:
  """Logits [T, vocab]; hidden=True: the hidden states after the final norm [T, dim]."""
  w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
  T, H, KV, hd = len(tokens), args.n_heads, args.n_kv_heads, args.dim // args.n_heads
  if angles is None:
    freqs = 1.0 / (args.rope_theta ** (np.arange(0, hd, 2) / hd))
    angles = np.outer(np.arange(T), freqs)
  x = w["tok_embeddings.weight"][tokens]
  mask = np.triu(np.full((T, T), -np.inf), 1)
  for i in range(args.n_layers):
    p = lambda n: w[f"layers.{i}.{n}"]  # noqa: E731
    h = rmsnorm(x, p("attention_norm.weight"), args.norm_eps)
    q = rope_complex((h @ p("attention.wq.weight").T).reshape(T, H, hd), angles) * attn_scale
    k = rope_complex((h @ p("attention.wk.weight").T).reshape(T, KV, hd), angles) * attn_scale
    v = (h @ p("attention.wv.weight").T).reshape(T, KV, hd)
    k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    x = x + np.einsum("hts,shd->thd", s, v).reshape(T, H * hd) @ p("attention.wo.weight").T
    h = rmsnorm(x, p("ffn_norm.weight"), args.norm_eps)
    a, b = h @ p("feed_forward.w1.weight").T, h @ p("feed_forward.w3.weight").T
    x = x + (a / (1 + np.exp(-a)) * b) @ p("feed_forward.w2.weight").T
  x = rmsnorm(x, w["norm.weight"], args.norm_eps)
  if hidden: return x
  return x @ w.get("output.weight", w["tok_embeddings.weight"]).T
