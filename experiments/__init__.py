"""experiments: runnable studies, the Countdown task, the model organism (SFT, RL) and the `forksight` CLI."""
