"""Plots in the style of the authors' figures (`shared/reference_figures/`): default matplotlib colours, large
circle markers, ±1 std bands, hidden top/right spines, bold suptitles, black-edged overlay bars."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.buckets import occupied  # noqa: E402
from common.results import atomic_write  # noqa: E402

LETTER_COLORS = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green", "D": "tab:red", "E": "tab:purple"}
OUTCOME_COLORS = {"Correct": "tab:green", "IDK": "tab:blue", "Incorrect": "tab:red"}
REWARD_COLORS = {1: "darkgreen", 0: "darkred"}
UNFAMILIARITY_LABEL = "Unfamiliarity Score"


@contextmanager
def paper_style(font_size: int = 14) -> Iterator[None]:
    with plt.rc_context({"font.size": font_size, "axes.titlesize": font_size, "axes.labelsize": font_size,
                         "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": font_size - 4,
                         "figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight"}):
        yield


def line_with_band(ax, x: Sequence[float], mean: Sequence[float], std: Sequence[float] | None, color: str,
                   label: str, alpha: float = 0.15, linewidth: float = 2.5) -> None:
    """A line with large circle markers and, when `std` is given, a shaded ±1 std band."""
    x, mean = np.asarray(x, float), np.asarray(mean, float)
    ax.plot(x, mean, "-o", color=color, label=label, markersize=9, linewidth=linewidth)
    if std is not None:
        std = np.asarray(std, float)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, linewidth=0)


def outcome_bars(ax, positions: Sequence[float], correct: Sequence[float], idk: Sequence[float],
                 width: float = 0.8) -> None:
    """The TriviaQA bars: full-height red (Incorrect), blue up to correct+IDK, green up to correct."""
    correct, idk = np.asarray(correct, float), np.asarray(idk, float)
    style = dict(width=width, edgecolor="black", linewidth=2)
    ax.bar(positions, np.ones_like(correct), color=OUTCOME_COLORS["Incorrect"], label="Incorrect", **style)
    ax.bar(positions, correct + idk, color=OUTCOME_COLORS["IDK"], label="IDK", **style)
    ax.bar(positions, correct, color=OUTCOME_COLORS["Correct"], label="Correct", **style)
    ax.set_ylim(0, 1)


def save_figure(fig, path: Path) -> None:
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def plot_familiarity(table, path: Path, title: str) -> None:
    """The synthetic world by exposure bin: the base model's accuracies (bars) and how well a direct and a
    recall-then-judge verifier separate right from wrong answers (lines). `table` is `familiarity.csv`."""
    bars = (("qa_accuracy", "Q/A greedy", "tab:blue"), ("qa_t1_accuracy", "Q/A T=1", "tab:cyan"),
            ("mc_accuracy", "Multiple choice (cloze)", "tab:orange"), ("letter_accuracy", "5-shot letter", "tab:gray"))
    with paper_style(font_size=12):
        fig, ax = plt.subplots(figsize=(9, 4.2))
        x = np.arange(len(table))
        width = 0.8 / len(bars)
        for i, (column, label, color) in enumerate(bars):
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, table[column], width=width, color=color,
                   edgecolor="black", linewidth=0.5, label=label)
        ax.plot(x, table["rm_probe_separation"], "-o", color="darkgreen", label="Recall-then-judge RM: separation")
        ax.plot(x, table["verify_separation"], "--o", color="darkred", label="Direct verification: separation")
        ax.axhline(0.25, color="gray", linestyle=":", linewidth=1)
        ax.set_xticks(x, table["exposure_bin"])
        ax.set_xlabel("Pretraining documents about the entity")
        ax.set_ylabel("Base model")
        ax.set_ylim(-0.1, 1.05)
        ax.set_title(title, fontweight="bold")
        ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        save_figure(fig, path)


def letter_panels(tables: dict, title: str, path: Path, bold_ticks: Sequence[float] = (),
                  ylabel: str = "Predicted Likelihoods (A-D)") -> None:
    """Figure 2/3's MMLU rows: one panel per ground-truth letter, the mean probability of each answer (A-D, and
    E when present) by unfamiliarity bin with a ±1 std band. `tables` come from `evaluation.mmlu_panel_tables`."""
    with paper_style():
        fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.6), sharex=True, sharey=True,
                                 squeeze=False)
        axes = axes[0]
        for ax, (gt, table) in zip(axes, tables.items()):
            shown = occupied(table)
            for letter, color in LETTER_COLORS.items():
                if f"p_{letter}_mean" in shown:
                    line_with_band(ax, shown.x_mean, shown[f"p_{letter}_mean"], shown[f"p_{letter}_std"], color,
                                   letter)
            ax.set_title(f"Ground truth label: $\\bf{{{gt}}}$")
            ax.set_ylim(-0.15, 1.15)
            ax.legend(loc="upper right")
            ax.set_xlabel(UNFAMILIARITY_LABEL)
        axes[0].set_ylabel(ylabel)
        ticks = [0, 0.25, 0.5, 0.75, 1.0]
        axes[0].set_yticks(ticks)
        for label, tick in zip(axes[0].get_yticklabels(), ticks):
            if tick in bold_ticks:
                label.set_fontweight("bold")
        fig.suptitle(title, fontweight="bold", y=1.06)
        save_figure(fig, path)


def outcome_figure(table, edges: Sequence[float], title: str, path: Path) -> None:
    """Figure 2/3's TriviaQA bars: stacked Correct / IDK / Incorrect ratios per bin of incorrect samples.
    `table` comes from `evaluation.triviaqa_table`."""
    with paper_style(font_size=18):
        fig, ax = plt.subplots(figsize=(6, 5))
        lo, hi = np.array(edges[:-1], float), np.array(edges[1:], float)
        shown = table["count"].to_numpy() > 0
        outcome_bars(ax, ((lo + hi) / 2)[shown], table.correct_mean[shown], table.idk_mean[shown],
                     width=0.8 * (hi - lo)[shown])
        ax.set_xticks(list(edges))
        ax.set_xlabel(UNFAMILIARITY_LABEL + " (incorrect samples of 12)")
        ax.set_ylabel("Ratio")
        ax.set_title(title, fontweight="bold")
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        save_figure(fig, path)


def reward_lines(table, title: str, path: Path, at_bin_index: bool = False,
                 xlabel: str = UNFAMILIARITY_LABEL) -> None:
    """Figure 4: a reward model's mean P(reward 1) on right (dark green) and wrong (dark red) answers by
    unfamiliarity bin, ±1 std bands. x is the bin's mean score, or with `at_bin_index` the bin's position labelled
    by its range (the TriviaQA panels). `table` has p_right_* and p_wrong_* columns per bin."""
    shown = occupied(table)
    x = shown["bin"].to_numpy() if at_bin_index else shown["x_mean"].to_numpy()
    with paper_style(font_size=18):
        fig, ax = plt.subplots(figsize=(6, 5))
        for reward, column in ((1, "p_right"), (0, "p_wrong")):
            line_with_band(ax, x, shown[f"{column}_mean"], shown[f"{column}_std"], REWARD_COLORS[reward],
                           f"Ground-Truth Reward {reward}", alpha=0.3, linewidth=5)
        if at_bin_index:
            ax.set_xticks(x, shown["bin_label"], fontsize=12)
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Predicted Likelihood of\nReward 1")
        ax.set_title(title, fontweight="bold")
        ax.legend(frameon=False, loc="best")
        save_figure(fig, path)


LONGFORM_TITLES = {"bio": "Biography Generation", "plot": "Plot Generation"}
RM_SERIES = (("standard_reward", "tab:orange", "-", "Standard RM"), ("conservative_reward", "tab:green", "-",
             "Conservative RM"), ("true_reward", "black", "--", "Ground Truth"))


def predicted_reward_lines(table, task: str, path: Path) -> None:
    """Figure 5: the mean predicted reward of each reward model and the ground truth by unfamiliarity bin, no
    bands (standard orange, conservative green, ground truth black dashed). `table` has <series>_mean columns."""
    shown = occupied(table)
    with paper_style(font_size=18):
        fig, ax = plt.subplots(figsize=(6, 5))
        for column, color, style, label in RM_SERIES:
            ax.plot(shown["x_mean"], shown[f"{column}_mean"], style, marker="o", color=color, label=label,
                    markersize=14, linewidth=5, alpha=0.8)
        ax.set_xlabel(UNFAMILIARITY_LABEL)
        ax.set_ylabel("Predicted Reward")
        ax.set_title(LONGFORM_TITLES[task], fontweight="bold")
        ax.legend(frameon=False, loc="best")
        save_figure(fig, path)


LONGFORM_METHODS = (("sft", "tab:blue", "Standard SFT"), ("rl_standard", "tab:orange", "RL+Standard RM"),
                    ("rl_conservative", "tab:green", "RL+Conservative RM"))


def fact_count_grid(tables: dict, path: Path) -> None:
    """Figure 7: true (top row) and false (bottom row) facts per response by unfamiliarity bin, one column per task,
    one line per method (SFT blue, RL + standard RM orange, RL + conservative RM green), no bands; the legend on
    top in three columns. `tables[task]` has a `method` column and n_true_mean / n_false_mean by bin."""
    with paper_style(font_size=18):
        fig, axes = plt.subplots(2, len(tables), figsize=(6 * len(tables), 10), squeeze=False)
        for col, (task, table) in enumerate(tables.items()):
            for row, (column, word) in enumerate((("n_true", "True"), ("n_false", "False"))):
                ax = axes[row, col]
                for method, color, label in LONGFORM_METHODS:
                    shown = occupied(table[table.method == method])
                    ax.plot(shown["x_mean"], shown[f"{column}_mean"], "-o", color=color, label=label,
                            markersize=14, linewidth=5, alpha=0.8)
                ax.set_xlabel(UNFAMILIARITY_LABEL)
                ax.set_ylabel(f"Number of $\\bf{{{word}}}$ Facts")
                if row == 0:
                    ax.set_title(LONGFORM_TITLES[task], fontweight="bold")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.04))
        fig.tight_layout()
        save_figure(fig, path)


def marked_text(ax, words: Sequence[tuple[str, bool]], x0: float = 0.02, y0: float = 0.95,
                line_height: float = 0.09, font_size: int = 11) -> None:
    """Words laid out left to right and wrapped at the axes' width, the marked ones in red (Fig. 8)."""
    renderer = ax.figure.canvas.get_renderer()
    axes_width = ax.get_window_extent(renderer).width
    x, y = x0, y0
    for word, marked in words:
        text = ax.text(x, y, word + " ", transform=ax.transAxes, va="top", fontsize=font_size,
                       color="tab:red" if marked else "black", fontweight="bold" if marked else "normal")
        width = text.get_window_extent(renderer).width / axes_width
        if x > x0 and x + width > 1 - x0:
            x, y = x0, y - line_height
            text.set_position((x, y))
        x += width


def response_grid(cells: Sequence[dict], row_labels: Sequence[str], path: Path) -> None:
    """Figure 8: greedy responses, one row per method and one column per entity, false facts' words in red.
    Each cell: {"title", "words": [(word, is_false)], "row"}; columns in the order of the cells' titles."""
    titles = list(dict.fromkeys(c["title"] for c in cells))
    with paper_style(font_size=12):
        fig, axes = plt.subplots(len(row_labels), len(titles), figsize=(4.5 * len(titles), 2.4 * len(row_labels)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ("top", "right", "left", "bottom"):
                ax.spines[side].set_visible(True)
        fig.canvas.draw()
        for cell in cells:
            ax = axes[row_labels.index(cell["row"]), titles.index(cell["title"])]
            marked_text(ax, cell["words"])
        for j, title in enumerate(titles):
            axes[0, j].set_title(title, fontweight="bold")
        for i, label in enumerate(row_labels):
            axes[i, 0].set_ylabel(label, fontweight="bold")
        save_figure(fig, path)


SETTING_COLORS = {"fact": "tab:green", "caution": "tab:blue", "both": "tab:purple", "fact-then-caution": "tab:orange"}
DECOMPOSITION_COLORS = {"All Correct": "tab:green", "Partial Correct": "yellowgreen", "Partial NotAttempt": "khaki",
                        "All NotAttempt": "tab:blue", "All Attempt and Wrong": "tab:red"}


def simplefact_figures(curves: dict, tradeoff, out_dir: Path) -> None:
    """SimpleFact's figures (SPEC.md 7.6): `reward_curves.png` (training reward per rollout step and eval reward
    per evaluation, one colour per setting), `tradeoff.png` (accuracy vs not-attempt rate of the cold start under
    each prompt, joined in order of caution, with the RL policies overlaid) and `settings.png` (the final 5-way
    decomposition of each setting side by side)."""
    with paper_style(font_size=12):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for setting, c in curves.items():
            color = SETTING_COLORS[setting]
            train = c[c.step > 0]
            axes[0].plot(train.step, train.reward, color=color, alpha=0.8, linewidth=1.2, label=setting)
            ev = c.dropna(subset=["eval_reward"])
            axes[1].plot(ev.step, ev.eval_reward, "-o", color=color, markersize=5, label=setting)
        axes[0].set(title="Training reward", xlabel="GRPO step", ylabel="Mean group reward")
        axes[1].set(title="Evaluation reward", xlabel="GRPO step")
        axes[1].legend(frameon=False)
        save_figure(fig, out_dir / "reward_curves.png")

        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        prompts = tradeoff[tradeoff.policy == "cold start"].sort_values("not_attempt")
        ax.plot(prompts.not_attempt, prompts.accuracy, "--o", color="gray", markersize=8, label="prompts (cold start)")
        for _, row in prompts.iterrows():
            ax.annotate(row.prompt, (row.not_attempt, row.accuracy), textcoords="offset points", xytext=(6, 4))
        for _, row in tradeoff[tradeoff.policy != "cold start"].iterrows():
            setting = row.policy.removeprefix("RL (").removesuffix(")")
            ax.plot(row.not_attempt, row.accuracy, "*", markersize=16, color=SETTING_COLORS[setting], label=row.policy)
        ax.set(xlabel="Not-attempt rate", ylabel="Accuracy", title="Accuracy vs caution")
        ax.legend(frameon=False, fontsize=9)
        save_figure(fig, out_dir / "tradeoff.png")

        finals = {s: c.dropna(subset=["eval_reward"]).iloc[-1] for s, c in curves.items()}
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(finals))
        bottom = np.zeros(len(finals))
        for column, color in DECOMPOSITION_COLORS.items():
            values = np.array([row[column] for row in finals.values()])
            ax.bar(x, values, bottom=bottom, color=color, edgecolor="black", label=column)
            bottom += values
        ax.set_xticks(x, list(finals))
        ax.set(ylabel="Questions (%)", title="Final evaluation by reward setting", ylim=(0, 100))
        ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        save_figure(fig, out_dir / "settings.png")
