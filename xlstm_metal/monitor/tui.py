"""The live terminal UI of `xlstm-metal top` (textual)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Static

from .top import (
    COLUMNS,
    DESCENDING,
    MAX_INTERVAL,
    MIN_INTERVAL,
    NO_JOBS,
    SORT_KEYS,
    Monitor,
    clear_cache,
    job_cells,
    kill_job,
    machine_text,
    size,
    sort_jobs,
    sparkline,
)


class ConfirmKill(ModalScreen[bool]):
    """y / Enter: send SIGTERM; n / Esc: cancel."""

    BINDINGS = [Binding("y,enter", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]
    DEFAULT_CSS = """
    ConfirmKill { align: center middle; }
    ConfirmKill > Static { width: auto; max-width: 90%; padding: 1 2; border: thick $error; background: $surface; }
    """

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(Text(self.text), id="confirm")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class TopApp(App):
    """Jobs table (sortable, selectable), machine summary, details of the selected job."""

    TITLE = "xlstm-metal top"
    CSS = """
    #machine { height: auto; padding: 0 1; background: $boost; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    #jobs { height: 1fr; }
    #empty { height: 1fr; content-align: center middle; color: $text-muted; }
    #detail { height: auto; max-height: 8; padding: 0 1; border-top: solid $primary; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse"),
        Binding("k", "kill", "Kill (SIGTERM)"),
        Binding("c", "clear_cache", "Clear MLX cache"),
        Binding("plus,equals_sign", "interval(0.5)", "Faster"),
        Binding("minus", "interval(2.0)", "Slower"),
    ]

    def __init__(self, interval: float = 1.0, directory: Path | None = None, monitor: Monitor | None = None):
        super().__init__()
        self.interval = interval
        self.monitor = monitor or Monitor(directory)
        self.directory = directory
        self.sort_key = "pid"
        self.reverse = False
        self.snapshot: dict[str, Any] = {"jobs": [], "machine": None}
        self._timer = None

    def compose(self) -> ComposeResult:
        yield Static("", id="machine")
        yield Static("", id="status")
        with Vertical():
            table = DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
            table.add_columns(*COLUMNS)
            yield table
            yield Static(NO_JOBS, id="empty")
        yield Static("", id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_data()
        self._timer = self.set_interval(self.interval, self.refresh_data)

    # ------------------------------------------------------------------ data
    def selected_pid(self) -> int | None:
        table = self.query_one("#jobs", DataTable)
        if not table.row_count:
            return None
        try:
            return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        except Exception:  # noqa: BLE001 -- cursor outside the rows
            return None

    def selected_job(self) -> dict[str, Any] | None:
        pid = self.selected_pid()
        return next((j for j in self.snapshot["jobs"] if j["pid"] == pid), None)

    def refresh_data(self) -> None:
        keep = self.selected_pid()
        self.snapshot = self.monitor.poll(self.interval)
        jobs = sort_jobs(self.snapshot["jobs"], self.sort_key, self.reverse)
        self.query_one("#machine", Static).update(Text(machine_text(self.snapshot["machine"])))
        table = self.query_one("#jobs", DataTable)
        table.clear()
        for job in jobs:
            # Escaped: a str cell is read as Rich markup ("runs/[exp1]/ckpt" showed "runs//ckpt").
            table.add_row(*map(escape, job_cells(job, self.monitor.history.get(job["pid"]))), key=str(job["pid"]))
        pids = [j["pid"] for j in jobs]
        if keep in pids:
            table.move_cursor(row=pids.index(keep))
        table.display = bool(jobs)
        self.query_one("#empty", Static).display = not jobs
        self.query_one("#status", Static).update(
            f"{len(jobs)} job{'s' * (len(jobs) != 1)} | sort: {self.sort_key}{' (reversed)' if self.reverse else ''} | "
            f"every {self.interval:g} s")
        self.update_detail()

    def update_detail(self) -> None:
        job = self.selected_job()
        detail = self.query_one("#detail", Static)
        if job is None:
            detail.update("")
            detail.display = False
            return
        detail.display = True
        hist = self.monitor.history.get(job["pid"], {})
        mem = job.get("memory") or {}
        limits = (f"soft {size(mem.get('soft_limit'))}, hard {size(mem.get('hard_limit'))}"
                  if mem.get("hard_limit") else "watchdog off")
        last = job.get("last_command")
        rank = f" (rank {job['rank']} of {job.get('world_size') or '?'})" if job.get("rank") is not None else ""
        speed = "".join(f"  {label} {job[key]:,.{digits}f}" if key != "lr" else f"  lr {job[key]:.2e}"
                        for key, label, digits in (("prefill_tps", "prefill", 1), ("decode_tps", "decode", 1),
                                                   ("loss", "loss", 4), ("lr", "lr", 0))
                        if isinstance(job.get(key), (int, float)))
        lines = [
            f"pid {job['pid']}{rank}: {' '.join(job.get('argv') or [])}"[:400],
            f"tokens/s {sparkline(hist.get('tokens_per_s', ()), 60)}  now {job.get('tokens_per_s') or 0:,.1f}{speed}",
            f"memory   {sparkline(hist.get('memory', ()), 60, floor=None)}  now {size(mem.get('usage'))} "
            f"({limits}, state {mem.get('state')})",
        ]
        if job.get("message"):
            lines.append(str(job["message"]))
        if last:
            lines.append(f"last command: {last.get('command')} "
                         + (f"(cache {size(last.get('cache_before'))} -> {size(last.get('cache_after'))})" if last.get("ok") else
                            str(last.get("error", ""))))
        detail.update(Text("\n".join(lines)))  # plain: a prompt "[INST] hi [/INST]" in argv showed " hi "

    def on_data_table_row_highlighted(self, _event) -> None:
        self.update_detail()

    # ------------------------------------------------------------------ actions
    def action_sort(self) -> None:
        self.sort_key = SORT_KEYS[(SORT_KEYS.index(self.sort_key) + 1) % len(SORT_KEYS)]
        self.reverse = self.sort_key in DESCENDING
        self.refresh_data()

    def action_reverse(self) -> None:
        self.reverse = not self.reverse
        self.refresh_data()

    def action_interval(self, factor: float) -> None:
        self.interval = min(MAX_INTERVAL, max(MIN_INTERVAL, round(self.interval * factor, 2)))
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_interval(self.interval, self.refresh_data)
        self.notify(f"refresh every {self.interval:g} s")
        self.refresh_data()

    def action_kill(self) -> None:
        job = self.selected_job()
        if job is None:
            self.notify("no job selected", severity="warning")
            return
        pid = job["pid"]

        def answer(yes: bool | None) -> None:
            if not yes:
                self.notify("not killed")
                return
            try:
                kill_job(pid, self.directory)  # still that job: the dialog may have waited long
            except ProcessLookupError:
                self.notify(f"{pid} has already ended", severity="warning")
            except PermissionError as err:
                self.notify(f"cannot signal {pid}: {err}", severity="error")
            else:
                self.notify(f"sent SIGTERM to {pid}")
            self.refresh_data()

        self.push_screen(ConfirmKill(f"Send SIGTERM to pid {pid} ({job.get('command')} {job.get('model') or ''})?\n"
                                     "y / Enter: yes    n / Esc: no"), answer)

    def action_clear_cache(self) -> None:
        job = self.selected_job()
        if job is None:
            self.notify("no job selected", severity="warning")
            return
        try:
            clear_cache(job["pid"], self.directory)
        except ProcessLookupError as err:
            self.notify(str(err), severity="warning")
        except OSError as err:  # the request file cannot be written (as `top --clear-cache` says): the view stays
            self.notify(f"cannot ask {job['pid']} to clear its MLX cache: {err}", severity="error")
        else:
            self.notify(f"asked {job['pid']} to clear its MLX cache")
