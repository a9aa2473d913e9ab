"""check-params: prove that params.yaml can run before any other stage does.

    dvc repro check-params
    python stages/check_params.py

DVC deletes a stage's outputs just before it runs the stage's command, so a value that a stage refuses (after
`dvc exp run -S key=bad`, say) would already have cost that stage its last good outputs. This stage reads every
param and comes first (download depends on its output, everything else on download), so a bad value stops the
pipeline here, with the workspace as it was. It validates the values (config.py: types, ranges, the rules between
keys) and then builds what the stages will build (preflight.py: the networks on the meta device, the noise
schedule, every sampler of sample.settings run on a stand-in model), so a value that only a constructor or the
mathematics refuses stops here too. Writes checks/params.ok, whose content never changes: downstream stages rerun
for their own params, never because this one ran.
"""

from scratch_diffusion.config import ParamsError, load_params
from scratch_diffusion.files import write_text
from scratch_diffusion.preflight import check_runnable
from scratch_diffusion.stage import run_stage

OUT = "checks/params.ok"


def main() -> None:
    try:
        check_runnable(load_params())
    except ParamsError as e:
        raise ParamsError(
            f"{e} (nothing else ran; back to the last good state: git checkout params.yaml && dvc checkout)"
        ) from None
    write_text(OUT, "params.yaml is valid\n")


if __name__ == "__main__":
    run_stage(main)
