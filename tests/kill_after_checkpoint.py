"""A `python -c` program for resume tests: `jaxpost train RECIPE`, SIGKILLed right after the
checkpoint of step N is on disk (argv: N, RECIPE). No fault-injection code in the package."""

import textwrap

WRAPPER = textwrap.dedent("""\
    import os, signal, sys
    from jaxpost.train import hooks
    kill_at, recipe = int(sys.argv[1]), sys.argv[2]
    real = hooks.Checkpoint.after_step

    def after_step(self, info):
      real(self, info)
      if info.step == kill_at:
        self.checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    hooks.Checkpoint.after_step = after_step
    from jaxpost.cli import main
    sys.exit(main(["train", recipe]))
    """)
