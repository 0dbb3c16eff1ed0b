"""DeepSpeed runs resumed from their checkpoints, on however many ranks this is launched with: what the engine
holds right after loading, then the losses of a few steps on fixed global batches.

    [torchrun ...] python tests/dist/ds_resume.py JOB [then JOB ...]
    JOB:  resume OUT_DIR STEPS [dotted.key=value ...]   (train.resume names the checkpoint)
          fit [dotted.key=value ...]                     (a run to resume later: Trainer.fit, as `clipkit train`)

The jobs run in turn in these processes (one start-up for all of them; DeepSpeed builds one engine per job).
OUT_DIR/state.safetensors (rank 0): the whole model as the resumed engine holds it ("weight/NAME", every
parameter and buffer) and the Adam moments of every parameter ("exp_avg/NAME", "exp_avg_sq/NAME"), assembled
across the ranks by DeepSpeed's safe_get_full_optimizer_state (ZeRO 1-3). OUT_DIR/resumed.json: the step the run
resumed at, the learning rate, and the global loss of each of STEPS steps. The batches are the same global
batches whatever the number of ranks (random images and captions from a fixed seed; rank r trains on its
r-th share of each), so two layouts that resumed the same state must give the same losses.
"""
from clipkit.startup import paused_collection

with paused_collection():  # start-up imports, as the CLI makes them (clipkit/startup.py)
    import sys

    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    from clipkit.config import load_config
    from clipkit.training import Trainer
    from fixed_batches import train_fixed_batches, write_outputs
    from jobs import split_then


def resume(out: str, steps: int, overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, overrides))
    env, engine = trainer.env, trainer.engine
    state = {f"weight/{k}": v.clone() for k, v in (engine.full_state_dict() or {}).items()}  # before any step
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 link each parameter to its optimizer state at the first step: now, to read it
        link()
    for name, param in trainer.module.named_parameters():  # collective: every rank assembles each moment
        for key in ("exp_avg", "exp_avg_sq"):
            moment = safe_get_full_optimizer_state(param, key)
            if moment is None:  # no ZeRO (stage 0): torch's optimizer holds the whole state on every rank
                moment = engine.optimizer.state[param][key]
            if env.is_main:
                state[f"{key}/{name}"] = moment.detach().float().cpu().clone().reshape(param.ds_shape if hasattr(
                    param, "ds_shape") else param.shape).contiguous()
    resumed = {"step": trainer.step, "lr": engine.lr, "losses": train_fixed_batches(trainer, steps)}
    write_outputs(out, state, resumed, env.is_main)
    return trainer


def fit(overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, overrides))
    trainer.fit()
    return trainer


def main(args: list[str]) -> None:
    jobs = split_then(args)
    trainer = None
    for kind, *rest in jobs:
        if kind == "fit":
            trainer = fit(rest)
        elif kind == "resume":
            trainer = resume(rest[0], int(rest[1]), rest[2:])
        else:
            raise SystemExit(f"ds_resume.py: a job is `fit ...` or `resume OUT STEPS ...`, not {kind!r}")
        if trainer.env.distributed:
            torch.distributed.barrier()
    if trainer is not None and trainer.env.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
