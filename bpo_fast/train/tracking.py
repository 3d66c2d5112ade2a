"""Trackers: ``--report-to none|tensorboard|wandb``, through the libraries themselves.

A :class:`Tracker` takes the same scalars the trainer writes to ``metrics.jsonl`` (``train/<key>``
for the step lines, ``eval_<set>/<key>`` as they are) and text (the eval samples). Only rank 0
logs. Both libraries are optional dependencies, imported when asked for: a missing one is a
one-line error naming ``--report-to`` and the ``pip install`` that fixes it, raised before the
model loads.

- ``tensorboard``: a ``SummaryWriter`` (``torch.utils.tensorboard``) writing event files under
  ``<output>/tensorboard``; a resumed run opens it with ``purge_step`` = the checkpoint's step +
  1, so the steps the interrupted run logged after its checkpoint are dropped rather than drawn
  twice.
- ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "bpo-fast", name=--run-name, dir=<output>,
  config=<the TrainConfig>)`` with ``id`` kept in ``<output>/wandb_id`` and ``resume="allow"``,
  so a resumed run continues the same W&B run. Mode, entity, API key: wandb's own environment
  variables (``WANDB_MODE=offline`` logs locally).
"""

import os

from bpo_fast.errors import UserError

__all__ = ["Tracker", "make_tracker", "check_tracker"]


def check_tracker(report_to):
    """The library of ``report_to`` imports (raises :class:`UserError` otherwise)."""
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError("report_to: tensorboard is not installed (pip install "
                            "tensorboard)") from None
    elif report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("report_to: wandb is not installed (pip install wandb)") from None
    elif report_to not in (None, "none"):
        raise UserError(f"report_to: expected none, tensorboard or wandb, got {report_to!r}")


class Tracker:
    """No tracker: every call does nothing."""

    def log(self, scalars, step):
        pass

    def log_text(self, tag, text, step):
        pass

    def close(self):
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, logdir, *, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=logdir, purge_step=purge_step)

    def log(self, scalars, step):
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def log_text(self, tag, text, step):
        self.writer.add_text(tag, text, global_step=step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, output, config, run_name, resumed):
        import wandb

        id_path = os.path.join(output, "wandb_id")
        run_id = None
        if resumed and os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = wandb.util.generate_id()
            with open(id_path, "w") as f:
                f.write(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bpo-fast"), name=run_name,
                              dir=output, config=config, id=run_id, resume="allow")

    def log(self, scalars, step):
        self.run.log({k: v for k, v in scalars.items() if k != "step"}, step=step)

    def log_text(self, tag, text, step):
        self.run.log({tag: self.wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self):
        self.run.finish()


def make_tracker(config, *, rank=0, resumed_step=None):
    """The tracker of ``config.report_to`` (rank 0; others get the no-op :class:`Tracker`)."""
    if rank != 0 or config.report_to in (None, "none"):
        return Tracker()
    check_tracker(config.report_to)
    if config.report_to == "tensorboard":
        return TensorBoardTracker(os.path.join(config.output, "tensorboard"),
                                  purge_step=None if resumed_step is None else resumed_step + 1)
    name = config.run_name or os.path.basename(os.path.abspath(config.output))
    return WandbTracker(config.output, config.to_dict(), name, resumed_step is not None)


def samples_markdown(samples):
    """Eval samples as a markdown table (TensorBoard renders it)."""
    def cell(s):
        return " ".join(str(s).split()).replace("|", "\\|")[:500]
    lines = ["| id | answer | chosen |", "|---|---|---|"]
    lines += [f"| {cell(x['id'])} | {cell(x['answer'])} | {cell(x['chosen'])} |" for x in samples]
    return "\n".join(lines)
