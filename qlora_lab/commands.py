"""The subcommands of `qlora-lab`: a table both the command line (cli.py) and tab completion (completion.py) read.

Its own leaf module so completion does not import cli (which imports completion): no import cycle.
"""

# command -> (module[:function] whose `main` is the command's entry, one line of help)
COMMANDS = {
    "train": ("qlora_lab.train", "fine-tune an adapter (conf/train.yaml)"),
    "prepare": ("qlora_lab.prepare", "convert and tokenize a run's data into the cache (same overrides as train)"),
    "inspect": ("qlora_lab.prepare:inspect_main", "show what a run would train on: summary + rows with trained tokens"),
    "merge": ("qlora_lab.merge", "merge a run's adapter into a standalone model (conf/merge.yaml)"),
    "export": ("qlora_lab.export", "GGUF / Ollama / Hub hand-off of a run, each checked (conf/export.yaml)"),
    "chat": ("qlora_lab.chat", "chat with a run or a merged model (conf/chat.yaml)"),
    "bench": ("qlora_lab.bench.app", "tokens/s and memory vs the plain TRL recipe (conf/bench.yaml)"),
    "report": ("qlora_lab.report", "write the sweep report of a multirun folder: report <sweep dir>"),
    "compare": ("qlora_lab.compare", "settings that differ, scores, speed, loss curves of runs: compare RUN RUN ..."),
    "runs": ("qlora_lab.compare:runs_main", "list the runs under a folder with status, age, settings, scores"),
}
# commands with their own argparse arguments instead of Hydra overrides (no config to compose or check)
PLAIN_COMMANDS = ("report", "compare", "runs")
