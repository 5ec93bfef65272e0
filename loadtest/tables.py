#!/usr/bin/env python3
"""The tables of docs/benchmarks.md (ebay scenario) from the load test's --json output:
python3 loadtest/tables.py docs/bench/ebay.json"""
import json, statistics, sys
j=json.load(open(sys.argv[1]))
runs=j['runs']
def f(x): return f"{round(x):,}"
print("| run | control plane (order) | per sample p50 / p90 / p99, sidecars | gateways | per client p50 / p90 / p99, sidecars | gateways | config change p99 (per client) | initial sync | CPU rounds: cp / harness / Envoys | CPU initial sync: cp / harness | CPU whole run: cp / harness | peak RSS | lost / stale at sample / content check | 20 real Envoys: per client p50 / p99 |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in runs:
    for cp in ('tributary','go-control-plane'):
        x=r[cp]; ps=x['per_sample_ms']; pc=x['per_client_ms']; ph=x['phases']
        cc=x['content_check']
        re=x.get('real_envoys',{})
        rpc=re.get('per_client_ms',{})
        tot_h=sum(v['harness_cpu_s'] for v in ph.values())
        print(f"| {r['run']} | {cp} ({x['position']}) | {f(ps['sidecars']['p50'])} / {f(ps['sidecars']['p90'])} / {f(ps['sidecars']['p99'])} | {f(ps['gateways']['p50'])} / {f(ps['gateways']['p90'])} / {f(ps['gateways']['p99'])} | {f(pc['sidecars']['p50'])} / {f(pc['sidecars']['p90'])} / {f(pc['sidecars']['p99'])} | {f(pc['gateways']['p50'])} / {f(pc['gateways']['p90'])} / {f(pc['gateways']['p99'])} | {f(x['config_change_per_client_ms']['all']['p99'])} | {x['initial_sync_s']:.1f} s | {ph['rounds']['control_plane_cpu_s']:.1f} / {ph['rounds']['harness_cpu_s']:.1f} / {ph['rounds']['envoys_cpu_s']:.1f} s | {ph['initial_sync']['control_plane_cpu_s']:.1f} / {ph['initial_sync']['harness_cpu_s']:.1f} s | {x['hub']['cpu_s']:.1f} / {tot_h:.1f} s | {x['hub']['peak_rss_bytes']/2**20:,.0f} MiB | {x['lost_updates']} / {x['stale_at_sample']} / {cc['resources_checked']:,} checked, {cc['missing']+cc['unexpected']+cc['wrong_content']} bad | {f(rpc.get('p50',0))} / {f(rpc.get('p99',0))} |")
print()
def med(cp, get):
    v=[get(r[cp]) for r in runs]
    return statistics.median(v), min(v), max(v)
rows=[("p99 per sample, all (ms)", lambda x:x['per_sample_ms']['all']['p99']),
("p99 per client, sidecars (ms)", lambda x:x['per_client_ms']['sidecars']['p99']),
("p99 per client, gateways (ms)", lambda x:x['per_client_ms']['gateways']['p99']),
("p99 per sample, gateways (ms)", lambda x:x['per_sample_ms']['gateways']['p99']),
("config change p99 (ms)", lambda x:x['config_change_ms']['p99']),
("initial sync (s)", lambda x:x['initial_sync_s']),
("CPU, rounds (s)", lambda x:x['phases']['rounds']['control_plane_cpu_s']),
("CPU, whole run (s)", lambda x:x['hub']['cpu_s']),
("peak RSS (MiB)", lambda x:x['hub']['peak_rss_bytes']/2**20),
("real Envoys p99 per client (ms)", lambda x:x.get('real_envoys',{}).get('per_client_ms',{}).get('p99',0)),
("lost updates", lambda x:x['lost_updates']),
]
print(f"| median (min–max) over {len(runs)} runs | Tributary | go-control-plane | peer / ours (median of per-run ratios) |")
print("|---|---|---|---|")
for name,g in rows:
    a=med('tributary',g); b=med('go-control-plane',g)
    ratios=[g(r['go-control-plane'])/g(r['tributary']) if g(r['tributary']) else 0 for r in runs]
    rr=statistics.median(ratios)
    def s(t): 
        if t[0]>=100: return f"{t[0]:,.0f} ({t[1]:,.0f}–{t[2]:,.0f})"
        return f"{t[0]:.2f} ({t[1]:.2f}–{t[2]:.2f})"
    print(f"| {name} | {s(a)} | {s(b)} | {rr:.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |" if name!="lost updates" else f"| {name} | {s(a)} | {s(b)} | |")
print()
print("| phase: median over runs | wall, Tributary | CPU Tributary / harness / real Envoys | wall, go-control-plane | CPU go-control-plane / harness / real Envoys |")
print("|---|---|---|---|---|")
for p in ('load','initial_sync','rounds','config_change','check'):
    cells=[]
    for cp in ('tributary','go-control-plane'):
        m=lambda k: statistics.median([r[cp]['phases'][p][k] for r in runs])
        cells.append(f"{m('wall_s'):.1f} s | {m('control_plane_cpu_s'):.1f} / {m('harness_cpu_s'):.1f} / {m('envoys_cpu_s'):.1f} s")
    print(f"| {p.replace('_',' ')} | {cells[0]} | {cells[1]} |")
