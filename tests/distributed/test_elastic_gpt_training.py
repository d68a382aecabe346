"""model=elastic_gpt on 2 real gloo processes, Birder 1-bit, under DDP and under HSDP (2 pretend nodes).

One spawn, two trainers in a row on each rank (each its own process group and run directory), built from the
app's config (``experiment=elastic_gpt_small`` at a tiny size). Each trains sandwich steps through ``fit()``
(the loss falls; one exchange per step; the search on val perplexity, the report and the exported subnets at
the end), then steps that never run the max subnet: elements outside the union of the step's subnets keep
x, m and b (weight decay is on, so a step that ignored the mask would move them), the rest move. Replicas
stay bit-identical throughout.
"""

import json
import math
from pathlib import Path

import torch

from tests.distributed.harness import free_ports, run_workers

TINY = ["experiment=elastic_gpt_small", "model.block_size=16", "model.n_layers=[1,2]", "model.n_heads=[1,2]",
        "model.n_embds=[16,32]", "model.mlp_ratios=[1,2]", "trainer.batch_size=4", "trainer.max_steps=10",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.resume=never",
        "data.eval_windows=8", "optim.lr=3e-3", "optim.schedule=constant", "optim.weight_decay=0.1",
        "supernet.search.population_size=4", "supernet.search.num_generations=0",
        "supernet.search.flops_fractions=[0.5]",
        "supernet.report_archs={mixnmatch:{n_embd:32,n_layer:2,n_head:[2,1],mlp_ratio:[1,2]}}"]
HSDP = ["trainer.parallelism=hsdp", "compression.num_nodes=2"]


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _flat(tensors) -> torch.Tensor:
    return torch.cat([_local(t).detach().reshape(-1) for t in tensors])


def _worker(rank, world_size, root, ports):
    import os

    import torch.distributed as dist

    from dist_supernet.supernet import build_sampler, load_subnet
    from dist_supernet.train import distributed
    from dist_supernet.train.supernet_trainer import SupernetTrainer
    from tests.configs import compose_train

    dist.destroy_process_group()  # each trainer makes its own (env://), as under torchrun
    out = {}

    def train(name, port, *overrides):
        os.environ["MASTER_PORT"] = port
        run_dir = Path(root) / name
        trainer = SupernetTrainer(compose_train(*TINY, *overrides), output_dir=run_dir)
        try:
            model, opt = trainer.model, trainer.optimizer
            exchanges = opt.comm_stats.num_exchanges
            summary = trainer.fit()
            result = {"summary": summary, "exchanges": opt.comm_stats.num_exchanges - exchanges,
                      "rows": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
                      "parallelism": trainer.parallel.kind, "uniform": []}
            # Subnets of a uniform sampler (never the max): some slices get no gradient in a step.
            trainer.arch_sampler = build_sampler({"name": "uniform", "num_archs": 2}, model, seed=1)
            params = list(model.parameters())
            views = [opt.hook_state.compressor.views(p) for p in params]
            for _ in range(3):
                archs = trainer.arch_sampler.sample(trainer.step, trainer.elastic_dims(trainer.step))
                touched = trainer._step_mask(archs)  # full shapes; with 1 rank per node a rank's shard is whole
                x0 = _flat(params).clone()
                m0, b0 = _flat(v["m"] for v in views).clone(), _flat(v["b"] for v in views).clone()
                trainer.train_step()
                trainer.step += 1
                x1, m1, b1 = _flat(params), _flat(v["m"] for v in views), _flat(v["b"] for v in views)
                untouched = ~touched
                result["uniform"].append({
                    "num_untouched": int(untouched.sum()),
                    "kept": [bool(torch.equal(a[untouched], b[untouched])) for a, b in ((x0, x1), (m0, m1), (b0, b1))],
                    "touched_moved": bool((x1[touched] != x0[touched]).any()),
                })
            result["in_sync"] = trainer.parallel.replicas_in_sync()
            result["sha"] = distributed.params_sha256(model)
            # The exported max subnet (a plain GPT, loaded from its file) scores what the report says.
            if rank == 0:
                report = json.loads((run_dir / "subnets.json").read_text())
                by_name = {e["name"]: e for e in report["subnets"]}
                module, _ = load_subnet(run_dir / by_name["max"]["file"])
                data = trainer.data
                with torch.no_grad():
                    losses = [(torch.nn.functional.cross_entropy(module(x).flatten(0, 1), y.flatten(),
                                                                 reduction="sum").item(), y.numel())
                              for x, y in data.eval_batches("val", rank=0, world_size=1, batch_size=4, model=module)]
                result["report"] = report
                result["exported_max_val_loss"] = sum(s for s, _ in losses) / sum(n for _, n in losses)
                result["plain"] = type(module).__name__
        finally:
            trainer.close()
        out[name] = result

    train("ddp", ports[0])
    train("hsdp", ports[1], *HSDP)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[2]}", rank=rank, world_size=world_size)
    return out


def test_elastic_gpt_trains_with_birder_under_ddp_and_hsdp(tmp_path):
    results = run_workers(_worker, 2, str(tmp_path), free_ports(3), timeout_s=600)  # why: ~25 s on 2 idle cores, 295 s seen at load 14
    for name, kind in (("ddp", "ddp"), ("hsdp", "hsdp")):
        first, second = results[0][name], results[1][name]
        assert first["parallelism"] == kind
        summary, rows = first["summary"], first["rows"]
        assert summary["params_in_sync"] and summary["params_sha256"] == second["summary"]["params_sha256"], name
        assert first["in_sync"][0] and first["sha"] == second["sha"], name  # still identical after the masked steps
        assert summary["compression"] == "birder" and summary["model"] == "elastic_gpt"
        # one compressed exchange per step (of 4 subnets; under FSDP2 one round over its 3 units); the loss falls
        assert first["exchanges"] == 10, (name, first["exchanges"])
        assert summary["eval_loss"] < rows[0]["loss"] - 0.4, (name, rows[0]["loss"], summary["eval_loss"])
        assert summary["eval_perplexity"] == math.exp(summary["eval_loss"]) and "test_perplexity" in summary
        for step in first["uniform"]:
            assert step["num_untouched"] > 0 and all(step["kept"]) and step["touched_moved"], (name, step)
        report = first["report"]
        names = [e["name"] for e in report["subnets"]]
        assert names == ["max", "min", "searched_1", "mixnmatch"] and report["metric"] == "perplexity"
        by_name = {e["name"]: e for e in report["subnets"]}
        assert by_name["max"]["val_loss"] == summary["eval_loss"]  # the trainer's evaluation: the max subnet
        assert summary["supernet"]["max_perplexity"] == by_name["max"]["perplexity"]
        assert by_name["min"]["flops"] < by_name["mixnmatch"]["flops"] < by_name["max"]["flops"]
        assert first["plain"] == "GPT" and abs(first["exported_max_val_loss"] - by_name["max"]["val_loss"]) < 1e-5
    # The same recipe, the same data and seed: the 1-bit exchange of DDP and of 2 nodes x 1 rank under FSDP2
    # compute the same thing, up to FSDP's float summation order.
    ddp, hsdp = results[0]["ddp"]["summary"], results[0]["hsdp"]["summary"]
    assert abs(ddp["eval_loss"] - hsdp["eval_loss"]) < 0.05, (ddp["eval_loss"], hsdp["eval_loss"])
