"""Forward-pass speed of oboro's MMH-DiT against ComfyUI's own NextDiT (Lumina 2), on CPU.

Why: MMH-DiT is a Lumina-Next style block (sandwich RMSNorm, tanh gates, QK-norm, SwiGLU, 3-axis
RoPE) plus a per-layer head schedule. With UNIFORM heads it should cost what NextDiT costs at the
same hidden size, depth, heads, MLP size and token count; if it is slower, our code (not the
architecture) is at fault. We time it with its default torch.nn + SDPA path and with ComfyUI's
ops + optimized_attention (what NextDiT uses), then the real progressive schedule, and report
CPU efficiency = model FLOP/s / large-matmul FLOP/s. fp32, torch.no_grad(), one process,
warm-up then the median of interleaved runs.

    .venv/bin/python bench/forward_vs_nextdit.py [--hidden 768 --depth 8 --heads 12 ...]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--hidden", type=int, default=768)
p.add_argument("--depth", type=int, default=8)
p.add_argument("--heads", type=int, default=12, help="uniform head count (ours and NextDiT)")
p.add_argument("--mlp", type=int, default=2048, help="SwiGLU inner size")
p.add_argument("--text-dim", type=int, default=1024)
p.add_argument("--text-tokens", type=int, default=64, help="ours adds a BOS; NextDiT gets one more context token")
p.add_argument("--latent", type=int, default=32, help="latent H = W")
p.add_argument("--channels", type=int, default=16)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--runs", type=int, default=5)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--comfy-attention", choices=["default", "pytorch"], default="default",
               help="ComfyUI's CPU default (sub-quadratic) or --use-pytorch-cross-attention (SDPA)")
a = p.parse_args()

oboro_env.add_comfy_to_path()
from comfy.cli_args import args as comfy_args  # noqa: E402

comfy_args.cpu = True
comfy_args.use_pytorch_cross_attention = a.comfy_attention == "pytorch"
import torch  # noqa: E402
import comfy.ops  # noqa: E402
from comfy.ldm.lumina.model import NextDiT  # noqa: E402
from comfy.ldm.modules.attention import optimized_attention  # noqa: E402

oboro = oboro_env.import_oboro()
from oboro.oboro_model import MMHDiT, OboroConfig, head_schedule  # noqa: E402

torch.set_num_threads(a.threads)
torch.manual_seed(0)

D, P, C = a.hidden, 2, a.channels
n_img = (a.latent // P) ** 2
L = 1 + a.text_tokens + n_img                  # joint sequence length, identical for both models
adaln = min(D, 1024)                           # NextDiT's adaLN width


def init_(model):  # same kind of random weights everywhere, so no path is zero-gated
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.02)
    return model.eval()


def oboro_cfg(heads):
    return OboroConfig(in_channels=C, patch_size=P, hidden_size=D, depth=a.depth, heads=heads,
                       mlp_hidden=a.mlp, text_dim=a.text_dim, adaln_dim=adaln)


def comfy_attention(q, k, v, mask):
    return optimized_attention(q, k, v, q.shape[1], mask=mask, skip_reshape=True)


uni = oboro_cfg((a.heads,) * a.depth)
hd = D // a.heads
ours = init_(MMHDiT(uni))
ours_comfy = init_(MMHDiT(uni, operations=comfy.ops.disable_weight_init, attention=comfy_attention))
# Progressive schedule: the paper's 8/16/24/48 heads at hidden 1536 = head dims 192/96/64/32;
# keep those head dims at this hidden size (768 -> 4/8/12/24 heads, as preset oboro-small).
groups = tuple(D // h for h in (192, 96, 64, 32))
mmh_heads = head_schedule(a.depth, groups)
mmh = init_(MMHDiT(oboro_cfg(mmh_heads)))

# NextDiT FeedForward hidden = multiple_of * ceil(int(mult * dim) / multiple_of); mult = mlp/dim and
# multiple_of = mlp give exactly mlp (int() may lose 1 to float rounding, the ceil restores it).
nextdit = init_(NextDiT(patch_size=P, in_channels=C, dim=D, n_layers=a.depth, n_refiner_layers=0,
                        n_heads=a.heads, multiple_of=a.mlp, ffn_dim_multiplier=a.mlp / D, qk_norm=True,
                        cap_feat_dim=a.text_dim, axes_dims=list(uni.rope_dims(hd)), rope_theta=uni.rope_theta,
                        operations=comfy.ops.disable_weight_init))
assert nextdit.layers[0].feed_forward.w1.weight.shape == ours.blocks[0].mlp.w1.weight.shape
assert nextdit.layers[0].attention.qkv.weight.shape == ours.blocks[0].attn.qkv.weight.shape

x = torch.randn(a.batch, C, a.latent, a.latent)
t = torch.rand(a.batch)
text = torch.randn(a.batch, a.text_tokens, a.text_dim)
text_nd = torch.randn(a.batch, a.text_tokens + 1, a.text_dim)   # + the BOS slot, same L

cases = {
    "ours (uniform heads)": lambda: ours(x, t, text),
    "nextdit": lambda: nextdit(x, t, text_nd, a.text_tokens + 1),
    "ours comfy-ops/attn (uniform heads)": lambda: ours_comfy(x, t, text),
    "ours MMH schedule": lambda: mmh(x, t, text),
}


def params(model):
    return sum(q.numel() for q in model.parameters())


def flops(head_counts):
    """Analytic forward FLOPs (multiply-add = 2). Per block: every token passes qkv (3D^2), out (D^2)
    and SwiGLU w1/w2/w3 (3*D*mlp) -> 2*(4D^2 + 3*D*mlp) per token; attention scores QK^T and
    A@V are 2*L^2*D each -> 4*L^2*D per sample (independent of the head count); adaLN is
    2*adaln*4D per sample. Plus embedders (text 2*text_dim*D, patch 2*4C*D per token), the
    timestep MLP and final layer. Norms, RoPE, softmax and elementwise ops are not counted."""
    tok_b, tok_t, tok_i = a.batch * L, a.batch * a.text_tokens, a.batch * n_img
    f = len(head_counts) * (2 * tok_b * (4 * D * D + 3 * D * a.mlp) + 4 * a.batch * L * L * D
                            + 2 * a.batch * adaln * 4 * D)
    f += 2 * tok_t * a.text_dim * D + 2 * tok_i * P * P * C * D * 2           # text, patch in/out
    f += 2 * a.batch * (256 * adaln + adaln * adaln + adaln * D)               # timestep MLP, final adaLN
    return f


def matmul_flops_per_s(n=2048, runs=5):
    m1, m2 = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        m1 @ m2
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        m1 @ m2
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts)


torch.set_flush_denormal(True)
with torch.no_grad():
    for fn in cases.values():                  # warm-up
        for _ in range(a.warmup):
            fn()
    times = {k: [] for k in cases}
    for _ in range(a.runs):                    # interleaved, so drift hits every case alike
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    peak = matmul_flops_per_s()
ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}

print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 CPU; ComfyUI attention = "
      f"{getattr(optimized_attention, '__wrapped__', optimized_attention).__name__}")
print(f"hidden {D}, depth {a.depth}, heads {a.heads} (head dim {hd}, rope {uni.rope_dims(hd)}), mlp {a.mlp}, "
      f"text_dim {a.text_dim}, batch {a.batch}, tokens {L} = 1 BOS + {a.text_tokens} text + {n_img} image "
      f"({a.latent}x{a.latent}x{C} latent, patch {P}); median of {a.runs} after {a.warmup} warm-up")
print(f"params: ours {params(ours) / 1e6:.2f}M, nextdit {params(nextdit) / 1e6:.2f}M, mmh {params(mmh) / 1e6:.2f}M")
print(f"ours (uniform heads): {ms['ours (uniform heads)']:.1f} ms")
print(f"nextdit: {ms['nextdit']:.1f} ms")
print(f"ratio ours/nextdit = {ms['ours (uniform heads)'] / ms['nextdit']:.3f}  (goal <= 1.05)")
print(f"ours comfy-ops/attn (uniform heads): {ms['ours comfy-ops/attn (uniform heads)']:.1f} ms")
print(f"ratio ours comfy-ops/attn / nextdit = {ms['ours comfy-ops/attn (uniform heads)'] / ms['nextdit']:.3f}  (goal <= 1.05)")
print(f"MMH schedule heads {mmh_heads} (head dims {sorted(set(uni.hidden_size // h for h in mmh_heads), reverse=True)})")
print(f"ours MMH schedule: {ms['ours MMH schedule']:.1f} ms  (ratio to uniform {ms['ours MMH schedule'] / ms['ours (uniform heads)']:.3f})")
print(f"matmul 2048^3 fp32: {peak / 1e9:.1f} GFLOP/s")
fl = flops(uni.heads)  # head count does not change the count, so it holds for MMH too
for k, v in ms.items():
    print(f"efficiency {k}: {fl / 1e9:.1f} GFLOP / {v:.1f} ms = {fl / v / 1e6:.1f} GFLOP/s = {fl / (v / 1e3) / peak:.1%} of matmul")
