import time, torch, sys, resource, json
from dataclasses import replace
torch.set_num_threads(2)
import klbelt.rl.trainer as T
from klbelt.demo.task import ENGLISH_DEMO_CONFIG
from klbelt.demo.models import load_model
from klbelt.demo.english import english_prompts
from klbelt.demo.rewards import *  # noqa
acc = {}
def wrap(name):
    f = getattr(T, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); acc.setdefault(name, []).append(time.perf_counter() - t)
        acc.setdefault(name+"_flt", []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        return r
    setattr(T, name, g)
for n in ["sample_batch", "score_batch", "shape_rewards_with_kl", "ppo_epochs", "observe_kl", "step_metrics"]:
    wrap(n)
import klbelt.rl.merged_sampler as MS
_r = MS.MergedCopySampler.refresh
def _rr(self, p):
    t = time.perf_counter(); _r(self, p); acc.setdefault("refresh", []).append(time.perf_counter()-t)
MS.MergedCopySampler.refresh = _rr
_s = MS.sample
def _ss(*a, **k):
    t = time.perf_counter(); r = _s(*a, **k); acc.setdefault("sample", []).append(time.perf_counter()-t); return r
MS.sample = _ss
over = dict(x.split("=") for x in sys.argv[1:])
cfg = replace(ENGLISH_DEMO_CONFIG, steps=5, controller="fixed", out="/tmp/w/run", checkpoint_every=1000, samples_every=1000, **{k: (v if k in ("sampler",) else eval(v)) for k, v in over.items()})
model, tok = load_model("smollm2")
print("rss after load", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)

from klbelt.demo.english import english_gold_reward
from klbelt.demo import rewards
proxy = rewards.proxy_reward
hist = T.train(cfg, model, tok, english_prompts("train"), proxy)
print({k: [round(x, 2) for x in v] for k, v in acc.items()})
print("s/update", [round(h["seconds"], 2) for h in hist])
print({k: hist[-1].get(k) for k in ["mismatch_k3", "mismatch_max_logratio", "kl"]})
