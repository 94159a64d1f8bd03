"""The sdpa block executor on keys and values that are a prefix view of a longer buffer (the engine's
cache) at a prompt length that is a whole number of blocks (8192 = 128 x 64, so nothing is padded):
one layer with a DHSA-768-like selection (sinks, local block, 8 random earlier blocks; the last
query block reads everything), SmolLM2's shape, 1 thread, median of 5, then a profile.

    .venv/bin/python docs/results/sdpa_executor/aligned_cache_view.py
"""
import torch, time
torch.set_num_threads(1)
from tokensparse.engine import blocks as B
from tokensparse.engine.selection import indices_from_mask
L=8192; bs=64; nb=L//bs
g=torch.Generator().manual_seed(0)
q=torch.randn(1,L,9,64).transpose(1,2)
kb=torch.randn(1,3,8449,64); vb=torch.randn(1,3,8449,64)
k=kb[:,:,:L]; v=vb[:,:,:L]
sets=torch.zeros(1,1,nb,nb,dtype=torch.bool)
for i in range(nb):
    if i<12 or i==nb-1: sets[0,0,i,:i+1]=True; continue
    sets[0,0,i,:2]=True; sets[0,0,i,i-1:i+1]=True
    cand=torch.arange(2,i-1); sets[0,0,i,cand[torch.randperm(len(cand),generator=g)[:8]]]=True
idx,valid=indices_from_mask(sets)
run=lambda kk,vv: B._sdpa(q,kk,vv,idx,valid,bs,bs,0.125,None,False)
for name,(kk,vv) in [("cache view",(k,v)),("contiguous",(k.contiguous(),v.contiguous()))]:
    run(kk,vv); ts=[]
    for _ in range(5):
        t=time.perf_counter(); run(kk,vv); ts.append(time.perf_counter()-t)
    print(name, sorted(ts)[2])
with torch.profiler.profile(record_shapes=True) as p: run(k,v)
print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=6, max_shapes_column_width=70))
