"""What the spawned processes of test_pretrained.py run, kept apart from the test module so that
a child imports only what it uses (torchvision and pytest's conftest take seconds to import on a
busy machine; a fetching child does not even need torch)."""

from __future__ import annotations

from raypipe.models.pretrained import fetch_pretrained


def fetch_in_process(barrier, results, uri: str, cache: str) -> None:
    barrier.wait()  # both start together, as the workers of one node do
    w = fetch_pretrained(uri, cache)
    results.put((w.downloaded, w.path, w.sha256))


def batches(n: int, channels: int = 1, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(4, channels, 32, 32, generator=g),
             "label": torch.randint(0, 2, (4,), generator=g)} for _ in range(n)]


def epoch(model, data, optimizer, freeze: str, index: int = 0) -> None:
    """One :func:`raypipe.training.loop.train_one_epoch`, BatchNorm statistics recomputed."""
    import torch

    from raypipe.training import loop
    from raypipe.training.doctor import GradientDoctor

    loop.train_one_epoch(model, data, optimizer, torch.nn.CrossEntropyLoss(),
                         torch.device("cpu"), GradientDoctor(), epoch=index,
                         bn_stats_samples=8, freeze=freeze)


def ddp_freeze(rank: int, world: int, port: int, weights: str, out: str) -> None:
    """One rank of a DDP run: an epoch with the backbone frozen, then one released; saves the
    state at the start, after the frozen epoch and at the end to ``out/rank<r>.pt``."""
    import torch
    import torch.distributed as dist

    from raypipe.models.resnet import create_model
    from raypipe.training.freeze import set_frozen

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(rank)  # a different fresh fc on each rank, as in raypipe's workers
        model = create_model("resnet18", in_channels=1, num_classes=2, pretrained=weights)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        set_frozen(model, "backbone", True)
        epoch(ddp, batches(2, seed=10 + rank), opt, "backbone")  # each rank its own data
        frozen = {k: v.clone() for k, v in model.state_dict().items()}
        set_frozen(model, "backbone", False)
        epoch(ddp, batches(2, seed=20 + rank), opt, "none", index=1)
        torch.save({"start": start, "frozen": frozen, "end": model.state_dict()},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
