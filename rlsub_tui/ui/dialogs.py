"""Modal screens: an error dialog, the help screen, and the criterion/tolerance/comparison-dtype dialog."""

from __future__ import annotations

from dataclasses import dataclass

from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, RadioButton, RadioSet, Static

from rlsub_tui.records.criteria import COMPARE_DTYPES, parse_sweep, parse_tolerance
from rlsub_tui.records.measures import NODE_MEASURES, RUN_MEASURES, markdown_table
from rlsub_tui.records.timelines import PATCH_DENSE


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


_HELP_TEMPLATE = """\
# rlsub-tui: which parameters did the runs update?

Close this help with **esc**, **q** or **?** (arrows / page keys scroll it).

**Updated parameter**, by the criterion chosen with `c` (shown in the title bar):
`atol` (the default, tolerance t = 1e-5, the paper's): |Δ| > t with Δ = run − base computed in
the pair's comparison dtype (t rounded to that dtype, as `torch.isclose` does); `exact`: the stored values
differ; `relative` (η = 1e-3 by default): |Δ| > η·max(|w0|,|w1|). NaN/Inf in either checkpoint
counts as updated. `c` also chooses the **comparison dtype** (`--compare-dtype`): `stored` compares
each run with the base in the less precise of the pair's two dtypes, `bf16`/`fp16`/`fp32` cast both
to that dtype first. The **sweep** (`sp@t` columns, chart 5) is the sparsity under `atol` at each
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
{node_table}

For a single tensor the table has one row per run:

{run_table}

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

**patch/dense** (in `analyze`'s timeline table; `patch_ratio` in `summary.json`): {patch_dense}.

## Exports
`e` writes the table, `x` the view's data (chart, heatmap, mask map, Δ histogram), as CSV in fractions (0.25 = 25%, never percent), each
with a `.json` beside it that records the criterion, sweep, base and run paths, the filter if one
is active, and what every column means.

"""


HELP = (_HELP_TEMPLATE.replace("{node_table}", markdown_table(NODE_MEASURES))
        .replace("{run_table}", markdown_table(RUN_MEASURES))  # the definitions, from the registry
        .replace("{patch_dense}", PATCH_DENSE.removeprefix("patch/dense: ")))

KEY_NAMES = {"question_mark": "?", "slash": "/", "bracketright": "]", "bracketleft": "[", "escape": "esc",
             "left": "←", "right": "→", "up": "↑", "down": "↓", "home": "home", "end": "end"}


def key_text(binding: Binding) -> str:
    """How the help writes a binding's keys: its key_display, else each key ('h,left' -> 'h / ←')."""
    if binding.key_display:
        return binding.key_display
    return " / ".join(KEY_NAMES.get(k.strip(), k.strip()) for k in binding.key.split(","))


def keys_markdown(groups: list[tuple[str, list[Binding]]]) -> str:
    """The help's table of keys, built from the bindings themselves so the two cannot drift apart.

    Keys for one action in one place share a row (a subclass's tooltip names it); a row alike in two places
    (j: down, in the tree and the table) is written once for both."""
    by_action: dict[tuple[str, str], tuple[list[str], str]] = {}
    for where, bindings in groups:
        for b in bindings:
            keys, what = by_action.get((where, b.action), ([], ""))
            keys += [k for k in key_text(b).split(" / ") if k not in keys]
            by_action[(where, b.action)] = (keys, b.tooltip or what or b.description)
    rows: dict[tuple[str, str], list[str]] = {}  # (keys, action) -> where
    for (where, _), (keys, what) in by_action.items():
        if what:
            rows.setdefault((" / ".join(keys), what), []).append(where)
    lines = ["| key | where | action |", "|---|---|---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in (keys, ", ".join(where), what)) + " |"
              for (keys, what), where in rows.items()]
    return "\n".join(lines)


class HelpScreen(ModalScreen[None]):
    """Definitions and keys, then what this session compares (its runs numbered as in the charts)."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="help.close")]

    def __init__(self, session: str = "", keys: str = ""):
        super().__init__()
        self.session = session
        self.keys = keys

    def compose(self) -> ComposeResult:
        text = HELP + ("\n## Keys\n" + self.keys + "\n" if self.keys else "")
        text += "\n## This session\n" + self.session + "\n" if self.session else ""
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
    compare_dtype: str = "stored"  # one of COMPARE_DTYPES


class Choice(RadioButton):
    """A radio button whose state shows without colour: `(●)` and a bold label when chosen, `( )` when not."""

    def render(self) -> Content:
        label = self.label.pad(1, 1).stylize_before(self.get_visual_style("toggle--label"))
        if self.value:
            label = label.stylize("bold")
        return Content.assemble("(●)" if self.value else "( )", label)  # as wide as the stock ▐●▌


class ChoiceSet(RadioSet):
    """A RadioSet whose arrows choose as they move, so the option marked is always the one highlighted, and
    whose enter goes on to the dialog around it (which applies)."""

    BINDINGS = [
        Binding("down,right", "choose(1)", "Next option", show=False),
        Binding("up,left", "choose(-1)", "Previous option", show=False),
        Binding("enter", "pass_on", show=False),  # RadioSet's own enter would only choose; space still does
    ]

    def action_pass_on(self) -> None:
        raise SkipAction()  # the binding is skipped: the key goes on to the screen's bindings

    def on_mount(self) -> None:
        # RadioSet highlights its first option on mount: highlight the chosen one instead, once that is done
        self.call_after_refresh(self._highlight_chosen)

    def _highlight_chosen(self) -> None:
        if self.pressed_index >= 0:
            self._selected = self.pressed_index

    def action_choose(self, step: int) -> None:
        options = list(self.query(RadioButton))
        if not options:
            return
        now = options.index(self.pressed_button) if self.pressed_button in options else (-1 if step > 0 else 0)
        new = options[(now + step) % len(options)]
        # all at once, not through RadioSet's handler of RadioButton.Changed: that runs later and reads the
        # buttons' values as they are then, so a key sent right after (an arrow, enter) would see the option before
        with self.prevent(RadioButton.Changed):
            for option in options:
                option.value = option is new
        self._pressed_button = new  # RadioSet's own record of the pressed button (what pressed_button returns)
        self._selected = options.index(new)  # and its highlight
        self.post_message(self.Changed(self, new))


class CriterionDialog(ModalScreen[CriterionChoice | None]):
    """Pick what counts as updated and the comparison dtype; the analysis is recomputed (ranks come from the
    cache when the dtype is unchanged)."""

    # enter applies from any field: an option set passes it on to this binding, the dialog itself (focused
    # as it opens) has it here, an input submits (on_input_submitted); on a button it presses that button
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="criterion.cancel"),
                Binding("enter", "apply", "Apply", id="criterion.apply")]

    def __init__(self, current: CriterionChoice):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        c = self.current
        with VerticalScroll(id="criterion-box", classes="dialog"):
            yield Label("What counts as an updated parameter?")
            yield Static("tab: next field · arrows: choose · enter: apply · esc: cancel", classes="hint")
            with ChoiceSet(id="criterion-set", compact=True):
                yield Choice("atol: |Δ| > tolerance (comparison dtype)", value=c.criterion == "atol", id="atol")
                yield Choice("exact: stored values differ", value=c.criterion == "exact", id="exact")
                yield Choice("relative: |Δ| > η·max(|w0|,|w1|)", value=c.criterion == "relative", id="relative")
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
            yield Static("compare in (stored: each pair's less precise dtype; bf16: as the paper)", id="dtype-label")
            with ChoiceSet(id="dtype-set", compact=True):
                for dtype in COMPARE_DTYPES:
                    yield Choice(dtype, value=c.compare_dtype == dtype, id=f"dtype-{dtype}")
            yield Static("", id="criterion-error")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _parse(self) -> CriterionChoice:
        radio = self.query_one("#criterion-set", RadioSet).pressed_button
        chosen = radio.id if radio is not None else self.current.criterion

        def number(field: str) -> float:
            return parse_tolerance(self.query_one(f"#{field}", Input).value, field)

        sweep = parse_sweep(self.query_one("#sweep", Input).value)
        dtypes = self.query_one("#dtype-set", RadioSet).pressed_button
        dtype = dtypes.id.removeprefix("dtype-") if dtypes is not None else self.current.compare_dtype
        return CriterionChoice(chosen, number("tolerance"), number("eta"), sweep, dtype)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        self.apply()

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self.apply()

    def action_apply(self) -> None:
        self.apply()

    def apply(self) -> None:
        try:
            self.dismiss(self._parse())
        except ValueError as exc:
            self.query_one("#criterion-error", Static).update(str(exc))

    def action_cancel(self) -> None:
        self.dismiss(None)
