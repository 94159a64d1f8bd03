import torch, time
torch.set_num_threads(1)
import tokensparse as ts
from tokensparse.engine.blocks import block_attend, blocks_from_sets
from tokensparse.engine.executors import dense_attention
torch.manual_seed(0)
L=8193
q=torch.randn(1,9,L,64); k=torch.randn(1,3,L,64); v=torch.randn(1,3,L,64)
def t(f,n=3):
    f(); ts_=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts_.append(time.perf_counter()-a)
    return sorted(ts_)[n//2]
for bs,win,per in ((64,128,"kv_head"),(64,128,"q_head"),(128,128,"q_head")):
    H=ts.methods.get("hip")(block=bs, window=win, select_per=per)
    sel=blocks_from_sets(H.choose(q,k)[0],bs,bs)
    tc=t(lambda: H.choose(q,k))
    d=t(lambda: dense_attention(q,k,v,None,0.125))
    for impl in ("sdpa","flex"):
        e=t(lambda: block_attend(q,k,v,sel,0.125,impl=impl))
        print(bs,win,per,impl,"dense",round(d,3),"exec",round(e,3),"x",round(d/e,2),"choose",round(tc,3), "with choose x", round(d/(e+tc),2), "blocks/row", sel.kept()/bs)
