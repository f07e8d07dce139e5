"""An RL loop on Ray: a trainer actor and a RayEngine (dp=2) in one placement group.

Each step: the engine generates rollouts; the trainer takes a gradient step on them (raising the
log-likelihood of the sampled completions, a stand-in for a policy-gradient update), broadcasts every
weight to every engine rank over the weight-sync group, and the engine's greedy output is checked against
transformers on the trainer's new weights.

    python examples/rl_loop.py                      # a tiny random llama, CPU, gloo, local Ray cluster
    python examples/rl_loop.py --model /ckpt --steps 5

docs/weight_updates.md walks through it.
"""

from __future__ import annotations

import argparse
import socket

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PROMPTS = ["The capital of France is", "Once upon a time", "Hello", "A B C"]
CHECK_TOKENS = 8


@ray.remote(num_cpus=1)
class Trainer:
    """The policy in transformers, rank 0 of the weight-sync group."""

    def __init__(self, model: str, lr: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def rendezvous(self) -> tuple[str, int]:
        """Where this actor's store will listen: its node's address and a free port."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def join(self, host: str, port: int, world_size: int) -> None:
        """Plain torch.distributed: the engine ranks meet this default group (blocks until they all joined)."""
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", world_size=world_size, rank=0)

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n, t in self.model.state_dict().items()
                if not (self.model.config.tie_word_embeddings and n == "lm_head.weight")]

    def meta(self) -> tuple[list[str], list[str], list[list[int]]]:
        from flotilla.rl import weights_meta

        return weights_meta(self.named_weights())

    def train_step(self, rollouts: list[tuple[list[int], list[int]]]) -> float:
        """One step on (prompt ids, completion ids): maximise the completions' log-likelihood."""
        self.model.train()
        self.opt.zero_grad()
        total = 0.0
        for prompt, completion in rollouts:
            ids = torch.tensor([prompt + completion])
            logits = self.model(ids).logits[0, len(prompt) - 1:-1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(completion)) / len(rollouts)
            loss.backward()
            total += float(loss)
        self.opt.step()
        self.model.eval()
        return total

    def broadcast(self) -> int:
        """Send every weight, in ``meta()`` order, from rank 0 of the group."""
        from flotilla.rl import broadcast_weights

        with torch.no_grad():
            names, _, _ = broadcast_weights(self.named_weights())
        return len(names)

    def greedy(self, prompt_ids: list[list[int]], n: int) -> list[list[int]]:
        out = []
        with torch.no_grad():
            for ids in prompt_ids:
                t = torch.tensor([ids])
                gen = self.model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
                out.append(gen[0, len(ids):].tolist())
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face checkpoint folder (default: a tiny llama)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    args = parser.parse_args()

    from flotilla import RayEngine, SamplingParams

    model = args.model
    if model is None:
        from flotilla.tools.tiny import tiny_model_path

        model = str(tiny_model_path("llama"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    # one placement group: bundle 0 the trainer, bundle 1 the engine's two rank actors
    pg = placement_group([{"CPU": 1}, {"CPU": 2}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    trainer = Trainer.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0)).remote(model, args.lr)
    engine = RayEngine(model=model, dp_size=2, device="cpu", dtype="float32", placement_group=pg,
                       bundle_indices=[1])
    try:
        tok = engine.tokenizer
        prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
        num_ranks = len(engine.weight_sync_ranks())
        host, port = ray.get(trainer.rendezvous.remote())
        # both sides block until everyone is in: the trainer's call runs while the engine's does
        joined = trainer.join.remote(host, port, 1 + num_ranks)
        engine.init_weights_update_group(host, port, rank_offset=1, world_size=1 + num_ranks, backend="gloo")
        ray.get(joined)
        names, dtypes, shapes = ray.get(trainer.meta.remote())
        engine.check_weights_update(names, dtypes, shapes)  # before any broadcast: a refused one would not be received
        greedy = SamplingParams(max_new_tokens=CHECK_TOKENS, temperature=0.0, ignore_eos=True)
        before = [o["token_ids"] for o in engine.generate(input_ids=prompt_ids, sampling_params=greedy,
                                                            use_tqdm=False)]
        changed = 0
        for step in range(1, args.steps + 1):
            rollout = SamplingParams(max_new_tokens=16, temperature=1.0, seed=step, ignore_eos=True)
            outs = engine.generate(input_ids=prompt_ids, sampling_params=rollout, use_tqdm=False)
            loss = ray.get(trainer.train_step.remote([(p, o["token_ids"]) for p, o in zip(prompt_ids, outs)]))
            sent = trainer.broadcast.remote()
            version = engine.update_weights_from_distributed(names, dtypes, shapes)
            ray.get(sent)
            ours = [o["token_ids"] for o in engine.generate(input_ids=prompt_ids, sampling_params=greedy,
                                                              use_tqdm=False)]
            theirs = ray.get(trainer.greedy.remote(prompt_ids, CHECK_TOKENS))
            status = "match" if ours == theirs else "MISMATCH"
            moved = sum(a != b for a, b in zip(ours, before))
            changed += moved
            print(f"step {step}: loss {loss:.3f}, weight version {version}, greedy vs transformers: {status}, "
                  f"{moved}/{len(PROMPTS)} greedy outputs changed by the update")
            if ours != theirs:
                raise SystemExit(f"engine {ours} != transformers {theirs}")
            before = ours
        engine.destroy_weights_update_group()
        if not changed:
            raise SystemExit("the updates never changed a greedy output: the check proved nothing (raise --lr)")
        print("ok")
    finally:
        engine.shutdown()
        ray.kill(trainer)
        remove_placement_group(pg)
        ray.shutdown()


if __name__ == "__main__":
    main()
