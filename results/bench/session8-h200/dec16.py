"""Time the 16-bit and KV4 paged decode kernels at the e2e run's decode shapes (whatever tree is on PYTHONPATH)."""
import math, sys, torch
from lowbit.bench.kernels import bench_ms, paged_decode_case, sdpa_case
for batch, ctx in ((600, 1024), (600, 1536), (1200, 1024), (2048, 1024)):
    for bits in (16, 4):
        per = 2 * 8 * (128 * 2 if bits == 16 else 72)
        copies = max(1, math.ceil((256 << 20) / (batch * ctx * per)))
        fns = [paged_decode_case("llama3-8b", batch, ctx, bits) for _ in range(copies)]
        us = bench_ms(lambda: [f() for f in fns]) / copies * 1e3
        print(f"{sys.argv[1]} dec batch {batch} ctx {ctx} bits {bits}: {us:.1f} us", flush=True)
        fns = None; torch.cuda.empty_cache()
