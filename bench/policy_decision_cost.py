"""CPU time of one policy decision (process_time: robust to other processes' load)."""
import time, random
import numpy as np
from token_recycling.policy import Policy
from token_recycling.auto_tree import CostModel, COST_SIZES
rng = np.random.default_rng(0)
p = Policy(topk=8, max_chain=10, max_ngram=4)
p.cost.set_curve(CostModel(list(COST_SIZES), [0.03 * (1 + n / 40) for n in COST_SIZES], context=300))
for _ in range(40):
    p.cost.record_step(int(rng.integers(1, 40)), 0.035, 0.040)
for _ in range(300):  # some statistics
    rows = rng.integers(0, 100, (4, 8)); p.auto.score_nodes(rows, rows[:, 0].copy())
cand = [(list(range(10)), 3), (list(range(20, 30)), 2)]
for _ in range(200):
    plan = p.decide(cand, 2); p.score_plan(plan, list(range(5)) + [99])
for label, c in (("no match", []), ("one candidate", cand[:1]), ("two candidates", cand)):
    t = time.process_time()
    for _ in range(2000):
        p.decide(c, 2)
    print(f"{label}: {1e6 * (time.process_time() - t) / 2000:.0f} us CPU per decision (tree refresh every 16 included)")
