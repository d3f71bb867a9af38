"""Static SASS counts of the KV4 decode kernel at the tile configs the 2026-12-04 sweep timed (run on the CPU:
`PYTHONPATH=. python results/bench/session8-h200/sass_decode_configs.py`); the table is in docs/benchmarks.md."""
import dataclasses

from lowbit.bench import sass
base = sass._decode_preset(4)
rows = []
for bn, st, w, nreg in [(128, 3, 4, None), (64, 3, 4, 128), (64, 2, 4, 96), (128, 3, 8, None), (128, 3, 8, 80), (256, 3, 8, None)]:
    c = dict(base.constexprs, BN=bn)
    p = dataclasses.replace(base, name=f"kv4 bn{bn} st{st} w{w} r{nreg}", constexprs=c, num_warps=w, num_stages=st,
                            maxnreg=nreg, bytes_per_iter=bn*2*(64+8))
    rows.append(sass.report(p))
print(sass.render(rows))
