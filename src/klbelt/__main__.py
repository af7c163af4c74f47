import os
import sys

from .cli.main import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torch.distributed worker (torchrun). Its process group is destroyed and its files are
    # written and closed by now; skip interpreter finalisation, where gloo's worker threads can
    # still hold tensors and abort the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
