"""What a person sees while ftune works: a rich progress bar, a header, result tables."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Off a terminal (CI logs, pipes) rich would wrap at 80 columns; keep lines whole there.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


class TrainProgress:
    """Progress bar with loss, lr and tokens/s. Off a terminal (CI, logs) it prints a line per log step."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.live = enabled and console.is_terminal
        self.quiet = not enabled
        self.progress = Progress(
            TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not self.live,
        )
        self.task = None

    def start(self, step: int) -> None:
        self.task = self.progress.add_task("train", total=self.total, completed=step, stats="")
        self.progress.start()

    def update(self, step: int, row: dict[str, Any] | None) -> None:
        stats = None
        if row is not None:
            stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
            if not self.live and not self.quiet:
                console.print(f"step {step:>6}/{self.total}  {stats}")
        self.progress.update(self.task, completed=step, **({"stats": stats} if stats else {}))

    def print_eval(self, step: int, metrics: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        console.print(f"[green]eval[/] step {step}: {shown}")

    def stop(self) -> None:
        self.progress.stop()


def print_header(run, params: tuple[int, int]) -> None:
    from ftune.models import model_label
    from ftune.packing import pack_budget

    trainable, total = params
    t = run.trainer
    console.print(
        f"[bold]ftune train[/]  model [cyan]{model_label(run.model_cfg)}[/]  "
        f"method [cyan]{run.method.name}[/]  data [cyan]{run.cfg.dataset.name}[/] "
        f"({len(run.data.train)} train / {len(run.data.eval)} eval)\n"
        f"  trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)  "
        f"{run.total_steps} steps × "
        + (f"packed rows of {pack_budget(t)} tokens" if t.packing else f"batch {t.batch_size}")
        + f" × accum {t.grad_accum}"
        + (f" × {run.world.world_size} processes ({run.trainer.distributed})" if run.world.enabled else "") + "  "
        f"lr {run.cfg.optimizer.lr}  device {run.device}  precision "
        f"{str(run.autocast_dtype).replace('torch.', '') if run.autocast_dtype else 'fp32'}\n"
        f"  output {run.out}"
    )
    report = run.ctx.report
    if "quantization/layers_4bit" in report:
        kept = report["quantization/layers_full_precision"]
        console.print(
            f"  4-bit NF4: {report['quantization/layers_4bit']} linear layers quantized, {kept} kept in full precision"
            + (f" ({report['quantization/full_precision_reason']})" if kept else "")
        )
    if "moe/experts" in report:  # an MoE model: its routing and which router losses apply
        losses = (f"load-balancing loss x{report['moe/aux_loss_coef']:g}"
                  + (f" + router z-loss x{report['moe/z_loss_coef']:g}" if report["moe/z_loss_coef"] else "")
                  if report["moe/router_trains"] else "router frozen: no router loss")
        console.print(f"  MoE: {report['moe/experts']} experts, top-{report['moe/top_k']}; {losses}")
    for line in run.method.header_lines(run.total_steps):  # e.g. the gradual unfreezing schedule
        console.print(f"  {escape(line)}", soft_wrap=True)
    for line in run.strategy.header_lines():  # e.g. distillation's teacher, student and loss weights
        console.print(f"  {escape(line)}", soft_wrap=True)
    for line in run.data.report.header_lines():  # rows left out of the data (dataset.bad_rows=skip), blank lines
        console.print(f"  [yellow]data[/] {escape(line)}", soft_wrap=True)


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, list):  # per-layer values (an MoE's loads): in metrics.json and the run card
            continue
        if isinstance(v, float):
            shown = f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        elif isinstance(v, int):
            shown = f"{v:,}"
        else:
            shown = str(v)
        table.add_row(k, shown)
    return table
