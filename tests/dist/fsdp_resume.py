"""An FSDP2 run resumed from a checkpoint (train.resume=...), on however many ranks it is launched with: what the
engine holds right after loading, then the losses of a few steps on fixed global batches.

    [torchrun ...] python tests/dist/fsdp_resume.py OUT_DIR STEPS SAVE [dotted.key=value ...]

OUT_DIR/state.safetensors (rank 0): the whole model as the resumed engine holds it ("weight/NAME") and the Adam
moments of every parameter ("exp_avg/NAME", "exp_avg_sq/NAME"), gathered from the shards by torch's
get_model_state_dict / get_optimizer_state_dict (full_state_dict=True). OUT_DIR/resumed.json: the step the run
resumed at, the learning rate, and the global loss of each of STEPS steps on batches that are the same whatever
the number of ranks (rank r trains on its r-th share). SAVE=1: right after loading, the run saves a checkpoint
of the step it resumed at, in its own run.dir (written by this number of ranks). Each `then OUT_DIR STEPS SAVE
...` is another resume after it, in the same processes (no second start-up).
"""
from clipkit.startup import paused_collection

with paused_collection():  # start-up imports, as the CLI makes them (clipkit/startup.py)
    import sys

    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from clipkit.config import load_config
    from clipkit.training import Trainer
    from fixed_batches import train_fixed_batches, write_outputs
    from jobs import split_then


def held_state(trainer: Trainer) -> dict:
    """The whole weights and Adam moments (rank 0; every rank takes part in gathering them)."""
    engine, full = trainer.engine, StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(engine.module, options=full)
    optim = get_optimizer_state_dict(engine.module, engine.optimizer, options=full)
    state = {f"weight/{k}": v.float().clone() for k, v in weights.items()}
    for name, moments in optim.get("state", {}).items():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}/{name}"] = moments[key].float().clone()
    return state


def resume(out: str, steps: int, save: bool, overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, overrides))
    env = trainer.env
    state = held_state(trainer)  # before any step
    if save:
        trainer.checkpoints.save(trainer.step)
    resumed = {"step": trainer.step, "lr": trainer.engine.lr, "losses": train_fixed_batches(trainer, steps)}
    write_outputs(out, state, resumed, env.is_main)
    if env.distributed:
        torch.distributed.barrier()
    return trainer


def main(args: list[str]) -> None:
    """Each `OUT STEPS SAVE overrides...` job, separated by `then`, in turn in these processes."""
    jobs = split_then(args)
    for out, steps, save, *overrides in jobs:
        resume(out, int(steps), save == "1", overrides)
    torch.distributed.destroy_process_group()  # FSDP2 joined a process group even on one rank


if __name__ == "__main__":
    main(sys.argv[1:])
