"""Reaching the proposer from outside the engine.

vLLM builds the proposer inside its worker process. ``LLM(..., worker_extension_cls=
"token_recycling.vllm.TokenRecyclingWorkerExtension")`` (a vLLM option) adds these methods to the
worker, so ``llm.collective_rpc("token_recycling_stats")`` returns each worker's statistics (its
proposer's GenerationStats as a dict, with ``acceptance``; live states; the step-cost fit) and
``llm.collective_rpc("token_recycling_save", args=(path,))`` saves the matrix.
"""

from __future__ import annotations


class TokenRecyclingWorkerExtension:
    def _token_recycling_proposer(self):
        runner = getattr(self, "model_runner", None)
        drafter = getattr(runner, "drafter", None)
        if drafter is None or not hasattr(drafter, "matrix"):
            raise RuntimeError("this worker has no TokenRecyclingProposer (is speculative_config's model "
                               "'token_recycling.vllm.TokenRecyclingProposer'?)")
        return drafter

    def token_recycling_stats(self) -> dict:
        proposer = self._token_recycling_proposer()
        memory = proposer.drafter.memory
        return dict(proposer.stats.as_dict(), live_states=len(proposer._states), state_bytes=proposer.state_bytes,
                    matrix_rows_filled=int((proposer.matrix.table != 0).any(-1).sum()), step_cost=proposer.cost.state(),
                    price=proposer.cost.price(), memory_tokens=len(memory), memory_capacity=memory.capacity,
                    memory_bytes=memory.nbytes)

    def token_recycling_save(self, path: str) -> bool:
        proposer = self._token_recycling_proposer()
        if not proposer._saves:
            return False
        proposer.save(path)
        return True
