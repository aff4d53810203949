"""Runs heretic or abliterix without a terminal for `cargo xtask compare` (xtask/src/compare.rs).

Usage: python compare_driver.py heretic|abliterix OUT_DIR TRIALS_JSON MAX_KL [TOOL ARGS...]

Both tools end by choosing a trial: heretic asks on the terminal, abliterix's batch mode takes the fewest
refusals at any KL. This driver makes both choose by `abliterate optimize`'s rule (docs/optimize.md, "Choice
rule"): among completed trials with KL <= MAX_KL, the fewest refusals, then the smallest KL, then the earliest
trial (every trial when none is under the bound). The chosen trial is saved as a merged Hugging Face model in
OUT_DIR, and every completed trial (index, refusals, KL, chosen) is written to TRIALS_JSON, which compare.rs
reads. It is run from the folder holding the tool's config file; nothing else of the tools is changed.
"""

import json
import sys

import torch

torch.set_num_threads(2)


def choose(rows, max_kl):
    """The index (into rows) of the trial optimize's rule chooses; rows are (index, refusals, kl)."""
    eligible = [r for r in rows if r[2] <= max_kl] or rows
    best = min(eligible, key=lambda r: (r[1], r[2], r[0]))
    return rows.index(best)


def write_trials(path, rows, chosen, max_kl):
    trials = [
        {"index": i, "refusals": refusals, "kl": kl, "chosen": n == chosen}
        for n, (i, refusals, kl) in enumerate(rows)
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"max_kl": max_kl, "trials": trials}, f, indent=1)


def run_heretic(out_dir, trials_json, max_kl):
    import glob

    import heretic.main as hm
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    state = {"chosen": None, "saved": False}

    def select(message, choices):
        if message.startswith("Which trial"):
            if state["saved"]:
                return ""
            # heretic offers only its Pareto front; the rule's choice is always on it, but every
            # completed trial is recorded, so read them from the study's journal.
            (journal,) = glob.glob("checkpoints/*.jsonl")
            study = optuna.load_study(
                study_name="heretic", storage=JournalStorage(JournalFileBackend(journal))
            )
            done = [t for t in study.trials if t.state == TrialState.COMPLETE]
            rows = [
                (t.user_attrs["index"], t.user_attrs["refusals"], t.user_attrs["kl_divergence"])
                for t in done
            ]
            n = choose(rows, max_kl)
            write_trials(trials_json, rows, n, max_kl)
            state["chosen"] = rows[n][0]
            for c in choices:
                if getattr(c.value, "user_attrs", {}).get("index") == state["chosen"]:
                    return c.value
            raise SystemExit(f"trial {state['chosen']} is not on heretic's Pareto front")
        if message.startswith("What do you want to do"):
            if state["saved"]:
                return ""
            state["saved"] = True
            return "Save the model to a local folder"
        raise SystemExit(f"unexpected question from heretic: {message}")

    hm.prompt_select = select
    hm.prompt_path = lambda message: out_dir
    hm.prompt_text = lambda message: ""
    hm.main()
    if not state["saved"]:
        raise SystemExit("heretic ended without saving a trial")


def run_abliterix(out_dir, trials_json, max_kl):
    import abliterix.cli as ac
    from optuna.trial import TrialState

    class Chosen:
        """The study, showing abliterix's batch-mode choice only the trials the rule allows."""

        def __init__(self, study):
            self._study = study

        def __getattr__(self, name):
            return getattr(self._study, name)

        @property
        def trials(self):
            done = [t for t in self._study.trials if t.state == TrialState.COMPLETE]
            rows = [(t.number + 1, t.user_attrs["refusals"], t.user_attrs["kl_divergence"]) for t in done]
            n = choose(rows, max_kl)
            write_trials(trials_json, rows, n, max_kl)
            # abliterix takes the fewest refusals, then the smallest KL, among the trials it sees.
            eligible = [t for t, r in zip(done, rows) if r[2] <= max_kl]
            return eligible or done

    run_search = ac.run_search
    ac.run_search = lambda *a, **k: Chosen(run_search(*a, **k))
    sys.argv += ["--non-interactive", "--non-interactive-output-dir", out_dir]
    ac.main()


def main():
    tool, out_dir, trials_json, max_kl = sys.argv[1:5]
    sys.argv = [tool] + sys.argv[5:]
    {"heretic": run_heretic, "abliterix": run_abliterix}[tool](out_dir, trials_json, float(max_kl))


if __name__ == "__main__":
    main()
