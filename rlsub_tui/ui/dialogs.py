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

**Updated parameter**: under `atol` (default t = 1e-5) a parameter counts as updated when
|Δ| > t with Δ = run − base computed in the stored dtype (t rounded to that dtype, as
`torch.isclose` does); `exact`: the stored values differ; `relative`: |Δ| > η·max(|w0|,|w1|).
NaN/Inf in either checkpoint counts as updated.

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
| done | tensors computed so far / tensors in the row |

For a single tensor the table has one row per run: updated count, sparsity, rank and its
maximum min(m,n), rank/max, the four spectrum figures / max, mean \\|Δ\\|, ‖Δ‖/‖W0‖ (Frobenius),
NaN/Inf count, and sparsity at each sweep tolerance.

## Charts
1 sparsity by layer depth (one line per run) · 2 overlap: o1 = \\|A∩B\\|/\\|A\\| per run pair
against chance \\|B\\|/n and the stratified chance E/\\|A\\| (`o` switches to Jaccard) · 3 agreement:
% of parameters updated by exactly j of K runs against independent runs (Poisson-binomial), pooled
and per tensor × \\|w0\\| exponent · 4 rank ratio per matrix ·
5 tolerance sweep · 6 updated fraction by |w0| (binary exponent of the base weight) ·
7 training timeline (a RUN that is a folder of step checkpoints): per step, sparsity against the
base, sparsity against the previous step, and the union of everything updated so far (% of params) ·
8 cumulative energy of Δ's spectrum: share of ‖Δ‖_F² in the top k singular values against k/min(m,n),
one line per run (a group: the mean curve of its matrices).

## Keys
| key | action |
|---|---|
| ↑↓ / j k | move · ← → / h l collapse / expand (tree) |
| g / G | top / bottom |
| enter | focus the node: table and chart follow it |
| tab | next pane |
| / | filter the tree by name (esc clears) |
| 1-8, [ ] | choose chart · o overlap metric |
| s / S | sort the table by the next column (▼ largest first) / reverse it |
| e / x | export the table / the chart's data to CSV |
| c | criterion and tolerance |
| esc | cancel the computation (keeps what is done) |
| w | tensors not compared (and why), and notes |
| ? | this help · q quit · ctrl+p command palette |
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="help.close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Markdown(HELP)

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
        with Vertical(id="criterion-box", classes="dialog"):
            yield Label("What counts as an updated parameter?")
            yield Static("tab: next field · enter in a field: apply · esc: cancel", classes="hint")
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
                yield Input(",".join(f"{t:g}" for t in c.sweep), placeholder="1e-8,1e-7,1e-6,1e-5", id="sweep",
                            compact=True)
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
