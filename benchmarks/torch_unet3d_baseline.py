# Our team's baseline, copied from shared/bench/torch_unet3d_baseline.py; unchanged but for the next two lines.
# ruff: noqa
# fmt: off
"""Baseline: diffusers' PyTorch UNet3DConditionModel at VideoCrafter2 shape (random weights).
Times one denoising step with classifier-free guidance (batch 2) for F frames at a 40x64 latent."""
import sys, time, torch
from diffusers import UNet3DConditionModel
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float16")
frames = [int(f) for f in (sys.argv[2] if len(sys.argv) > 2 else "16,32,64").split(",")]
compile_ = len(sys.argv) > 3 and sys.argv[3] == "compile"
m = UNet3DConditionModel(sample_size=None, in_channels=4, out_channels=4,
                         block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                         cross_attention_dim=1024, attention_head_dim=64).to("cuda", dtype).eval()
print("params", sum(p.numel() for p in m.parameters()) / 1e6, "M", "dtype", dtype, "compile", compile_)
fwd = torch.compile(m) if compile_ else m
for F in frames:
    x = torch.randn(2, 4, F, 40, 64, device="cuda", dtype=dtype)
    t = torch.tensor([981, 981], device="cuda")
    ctx = torch.randn(2, 77, 1024, device="cuda", dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):
            fwd(x, t, encoder_hidden_states=ctx).sample
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(5):
            s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
            s.record(); fwd(x, t, encoder_hidden_states=ctx).sample; e.record(); torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
    ts.sort()
    med = ts[len(ts) // 2]
    print(f"F={F:4d} step(CFG)={med:8.1f} ms  per-frame-step={med / F:6.2f} ms  peak={torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB")
