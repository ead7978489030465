"""Modal screens: an error dialog, the help screen, and the criterion/tolerance dialog."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, RadioButton, RadioSet, Static


class ErrorDialog(ModalScreen[None]):
    """One clear sentence about what went wrong; the app stays alive behind it."""

    BINDINGS = [Binding("escape,enter,q", "dismiss_dialog", "Close", id="dialog.close")]

    def __init__(self, title: str, message: str):
        super().__init__()
        self.title_text = title
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box", classes="dialog"):
            yield Label(self.title_text, id="error-title")
            yield Static(self.message, id="error-message", markup=False)
            yield Button("OK", variant="error", id="error-ok")

    def on_button_pressed(self, _event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_dismiss_dialog(self) -> None:
        self.dismiss(None)


HELP = """\
# rlsub-tui: which parameters did the runs update?

Close this help with **esc**, **q** or **?** (arrows / page keys scroll it).

**Updated parameter**, by the criterion chosen with `c` (shown in the title bar):
`atol` (the default, tolerance t = 1e-5, the paper's): |Δ| > t with Δ = run − base computed in
the stored dtype (t rounded to that dtype, as `torch.isclose` does); `exact`: the stored values
differ; `relative` (η = 1e-3 by default): |Δ| > η·max(|w0|,|w1|). NaN/Inf in either checkpoint
counts as updated. The **sweep** (`sp@t` columns, chart 5) is the sparsity under `atol` at each
listed tolerance, computed in the same pass: on by default at the paper's 1e-8, 1e-7, 1e-6, 1e-5
(`--sweep none`, or an empty sweep box in `c`, turns it off; the title bar then says "no sweep").

**Runs are numbered** 1..K in the order given on the command line (the title bar lists how many);
`i·j` in the overlap chart is the pair of runs i and j, named in full in its CSV (`x`).

## The tree
Each row reads `sparsity bar name`: the mean update sparsity of the node over the runs, then a
bar of 6 cells whose filled part (█) is the *updated* share (1 − sparsity), so dense nodes stand
out; `…` and `······` mean not computed yet; `3/9` after a name counts the tensors done so far.
With a filter, the top row says how many tensors match: every number pools only those.
A line cut at the pane's edge ends in `…`.

## Columns of the table
| column | meaning |
|---|---|
| params | parameters compared in the row |
| sparsity | mean over runs of the update sparsity 1 − updated / params (pooled, numel-weighted) |
| jacc | mean over run pairs of the Jaccard index \\|A∩B\\|/\\|A∪B\\| of the updated sets |
| @rnd (after jacc) | the Jaccard expected for independent random sets of the same densities: pq/(p+q−pq) |
| all K | consensus: fraction of parameters updated by every run |
| @rnd (after all K) | consensus expected if runs were independent: the product of densities |
| rank | mean of rank(Δ)/min(m,n) over the row's 2-D matrices and runs (PyTorch's default float32 tolerance) |
| sp RUN | update sparsity of that run |
| @str | mean Jaccard chance of the stratified null: expected \\|A∩B\\| = Σ a_s·b_s/n_s over strata s = tensor × exponent of \\|w0\\| |
| all K@str | consensus expected under the stratified null (a Poisson-binomial per stratum) |
| stable / e90 / e99 / eff | mean over 2-D matrices and runs, each / min(m,n): stable rank ‖Δ‖_F²/σ₁²; energy rank at 90% / 99% (fewest σ holding that share of Σσ²); effective rank exp(−Σ p ln p), p = σ/Σσ |
| hid bf16 | true updates hidden by a bf16 cast (bf16(w1) = bf16(w0)) / true updates, pooled over runs and tensors whose pair is finer than bf16 (fp32 master weights); – for bf16 pairs |
| rows / cols | share of the 2-D matrices' rows / columns holding at least one update, row- / column-weighted over matrices and runs |
| rows@rnd / cols@rnd | that share if each matrix's updates were spread uniformly: 1 − (1 − density)^(row / column length) |
| done | tensors computed so far / tensors in the row |

For a single tensor the table has one row per run: updated count, sparsity, rank and its
maximum min(m,n), rank/max, the four spectrum figures / max, mean \\|Δ\\|, ‖Δ‖/‖W0‖ (Frobenius),
NaN/Inf count, vis bf16 (positions whose bf16 casts differ), hid bf16, rows, cols and their chance
levels, and sparsity at each sweep tolerance.

## Charts and views
1 sparsity by layer depth (one line per run; inside one layer: that tensor type in every layer, the
focused layer in red) · 2 overlap per run pair i·j: lift of o1 = \\|A∩B\\|/\\|A\\| over chance \\|B\\|/n
(`o` switches to Jaccard against pq/(p+q−pq); the export also holds the stratified chance E/\\|A\\|) ·
3 agreement: % of parameters updated by exactly j of K runs against independent runs
(Poisson-binomial), pooled and per tensor × \\|w0\\| exponent · 4 rank ratio per matrix ·
5 tolerance sweep · 6 updated fraction by |w0| (binary exponent of the base weight) ·
7 K×K heatmap of o1, Jaccard or lift, coloured by lift · 8 mask map: the focused tensor in blocks,
shaded by the fraction updated · 9 histogram of log2 \\|Δ\\| per run, the tolerance marked ·
0 cumulative energy of Δ's spectrum: share of ‖Δ‖_F² in the top k singular values against
k/min(m,n), one line per run (a group: the mean curve of its matrices) · t training timeline (a RUN
that is a folder of step checkpoints): per step, sparsity against the base, sparsity against the
previous step, and the union of everything updated so far (% of params) · p distance to bf16
visibility: share of each run's true updates per log2 bin of r = \\|Δ\\| / (ULP_bf16(w0)/2), r < 1 hidden
by a bf16 cast (pairs finer than bf16; for bf16 pairs \\|Δ\\| in ULPs of w0).

## Exports
`e` writes the table, `x` the view's data (chart, heatmap, mask map, Δ histogram), as CSV in fractions (0.25 = 25%, never percent), each
with a `.json` beside it that records the criterion, sweep, base and run paths, the filter if one
is active, and what every column means.

## Keys
| key | action |
|---|---|
| ↑↓ / j k | move · ← → / h l collapse / expand (tree) |
| g / G | top / bottom |
| enter | focus the node: table and chart follow it |
| tab / shift+tab | switch between the tree and the table |
| / | filter the tree by name (enter keeps it, esc clears) |
| 1-9, 0, t, p, [ ] | view: 1 depth · 2 overlap · 3 agreement · 4 rank · 5 sweep · 6 \\|w0\\| · 7 heatmap · 8 mask map · 9 Δ histogram · 0 spectrum · t timeline · p bf16 visibility |
| o | overlap chart: o1 / Jaccard; heatmap: o1 / Jaccard / lift |
| b · m | heatmap: runs / run groups · mask map: every chosen run / one run |
| r | choose the runs the pooled figures use |
| s / S | sort the table by the next column (▼ largest first) / reverse it |
| e / x | export the table / the chart's data to CSV |
| c | criterion, tolerance, η and sweep |
| esc | cancel the computation (keeps what is done) |
| w | tensors not compared (and why), and notes |
| ? | this help (esc closes it) · q quit · ctrl+p command palette |
"""


class HelpScreen(ModalScreen[None]):
    """Definitions and keys, then what this session compares (its runs numbered as in the charts)."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="help.close")]

    def __init__(self, session: str = ""):
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        text = HELP + ("\n## This session\n" + self.session + "\n" if self.session else "")
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Markdown(text)
        yield Static("esc, q or ? closes the help", id="help-close", classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)


class WarningsScreen(ModalScreen[None]):
    """Every tensor left out of the comparison with its reason, and every note (mixed dtypes, NaN, ...)."""

    BINDINGS = [Binding("escape,q,w", "close", "Close", id="warnings.close")]

    def __init__(self, skipped, notes: list[str]):
        super().__init__()
        self.skipped = list(skipped)
        self.notes = list(notes)

    def compose(self) -> ComposeResult:
        lines = [f"{len(self.skipped)} tensor(s) not compared:"]
        lines += [f"  {k.tensor} [{k.run}]: {k.reason}" for k in self.skipped] or ["  none"]
        lines += ["", f"{len(self.notes)} note(s):"] + ([f"  {n}" for n in self.notes] or ["  none"])
        with VerticalScroll(id="warnings-box", classes="dialog"):
            yield Static("\n".join(lines), id="warnings-text", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)


@dataclass
class CriterionChoice:
    criterion: str
    tolerance: float
    eta: float
    sweep: tuple[float, ...]


class CriterionDialog(ModalScreen[CriterionChoice | None]):
    """Pick what counts as updated; the analysis is recomputed (ranks come from the cache)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="criterion.cancel")]

    def __init__(self, current: CriterionChoice):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        c = self.current
        with VerticalScroll(id="criterion-box", classes="dialog"):
            yield Label("What counts as an updated parameter?")
            yield Static("tab: next field · enter: apply · esc: cancel", classes="hint")
            with RadioSet(id="criterion-set", compact=True):
                yield RadioButton("atol: |Δ| > tolerance (stored dtype)", value=c.criterion == "atol", id="atol")
                yield RadioButton("exact: stored values differ", value=c.criterion == "exact", id="exact")
                yield RadioButton("relative: |Δ| > η·max(|w0|,|w1|)", value=c.criterion == "relative", id="relative")
            with Horizontal(classes="field"):
                yield Label("tolerance")
                yield Input(f"{c.tolerance:g}", id="tolerance", compact=True)
            with Horizontal(classes="field"):
                yield Label("η")
                yield Input(f"{c.eta:g}", id="eta", compact=True)
            with Horizontal(classes="field"):
                yield Label("sweep")
                # the current sweep as a value, never as placeholder text: an empty box means no sweep
                yield Input(",".join(f"{t:g}" for t in c.sweep), placeholder="off: e.g. 1e-8,1e-7,1e-6,1e-5",
                            id="sweep", compact=True)
            yield Static("", id="criterion-error")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _parse(self) -> CriterionChoice:
        radio = self.query_one(RadioSet)
        chosen = radio.pressed_button.id if radio.pressed_button else self.current.criterion

        def number(field: str) -> float:
            text = self.query_one(f"#{field}", Input).value.strip()
            try:
                v = float(text)
            except ValueError:
                raise ValueError(f"{field} '{text}' is not a number") from None
            if not (v >= 0 and v != float("inf")):
                raise ValueError(f"{field} must be a finite number >= 0")
            return v

        sweep_text = self.query_one("#sweep", Input).value.strip()
        sweep = []
        for part in filter(None, (p.strip() for p in sweep_text.split(","))):
            try:
                v = float(part)
            except ValueError:
                raise ValueError(f"sweep value '{part}' is not a number") from None
            if not (v >= 0 and v != float("inf")):
                raise ValueError("sweep values must be finite numbers >= 0")
            sweep.append(v)
        return CriterionChoice(chosen, number("tolerance"), number("eta"), tuple(sorted(sweep)))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        self.apply()

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self.apply()

    def apply(self) -> None:
        try:
            self.dismiss(self._parse())
        except ValueError as exc:
            self.query_one("#criterion-error", Static).update(str(exc))

    def action_cancel(self) -> None:
        self.dismiss(None)
