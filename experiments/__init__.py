"""experiments: the application on top of the library: the `forksight` CLI, the studies (`study/`),
the organisms' training (`training/`: SFT, GRPO) and their data (`organisms/`), the real pair's files
(`real/`) and the shipped results (`results/`). The tasks themselves live in `probe.tasks`."""
