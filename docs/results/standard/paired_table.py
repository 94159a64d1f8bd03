"""Paired-difference table (vs dense, same samples) with per-task cells, for chosen labels.

    .venv/bin/python docs/results/standard/paired_table.py RESULTS.jsonl "label|label|..." [LENGTH]
"""
import json,sys,collections
from tokensparse.eval.stats import paired
path, labels, length = sys.argv[1], sys.argv[2].split('|'), (int(sys.argv[3]) if len(sys.argv)>3 else None)
rows=[json.loads(l) for l in open(path)]
rows=[r for r in rows if not r.get('error') and (length is None or r['length']==length)]
dense={r['sample_id']:r for r in rows if r['method']=='dense' and r['placement']=='inside'}
tasks=sorted({r['task'] for r in rows})
print("| configuration | n | accuracy (dense) | Δ accuracy, pt [95% CI] | ↑/↓/= | Δ loglik, nats [95% CI] | " + " | ".join(tasks) + " |")
print("|---|--:|--:|--:|--:|--:|" + "--:|"*len(tasks))
for lab in labels:
    rs=[r for r in rows if r['label']==lab and r['sample_id'] in dense]
    if not rs: continue
    da=[r['score']-dense[r['sample_id']]['score'] for r in rs]
    dl=[r['answer_loglik']-dense[r['sample_id']]['answer_loglik'] for r in rs if r.get('answer_loglik') is not None]
    a,l=paired(da),paired(dl,tol=1e-3)
    acc=100*sum(r['score'] for r in rs)/len(rs); dacc=100*sum(dense[r['sample_id']]['score'] for r in rs)/len(rs)
    cells=[]
    for t in tasks:
        x=[r['score']-dense[r['sample_id']]['score'] for r in rs if r['task']==t]
        y=[r['answer_loglik']-dense[r['sample_id']]['answer_loglik'] for r in rs if r['task']==t and r.get('answer_loglik') is not None]
        cells.append(f"{100*sum(x)/len(x):+.0f} / {sum(y)/len(y):+.1f}" if x else "—")
    print(f"| `{lab}` | {len(rs)} | {acc:.0f}% ({dacc:.0f}%) | {100*a['mean']:+.1f} [{100*a['low']:+.1f}, {100*a['high']:+.1f}] | {a['wins']}/{a['losses']}/{a['ties']} | {l['mean']:+.2f} [{l['low']:+.2f}, {l['high']:+.2f}] | " + " | ".join(cells) + " |")
