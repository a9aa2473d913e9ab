"""check-params: prove that params.yaml can run, on the data it names, before any other stage does.

    dvc repro check-params
    python stages/check_params.py

DVC deletes a stage's outputs just before it runs the stage's command, so a value that a stage refuses (after
`dvc exp run -S key=bad`, say) would already have cost that stage its last good outputs. This stage reads every
param and comes first (download depends on its outputs, everything else on download), so a bad value stops the
pipeline here, with the workspace as it was. It validates the values (config.py: types, ranges, the rules between
keys), lists the data source (data.source_listing: for an image folder, every image decoded and checksummed, so an
unreadable file is named now), and builds what the stages will build on data of that shape (preflight.py: the
networks on the meta device, the noise schedule, every sampler of sample.settings run on a stand-in model), and asks
the MLflow store whether it takes the runs (the server answers, takes the credentials, the experiment is not deleted).

Writes checks/params.ok, whose content never changes (downstream stages rerun for their own params, never because
this one ran), checks/source.json, the source's listing with checksums: DVC cannot see a folder that params
name, so the stage runs every time (always_changed) and download reruns exactly when the listing changed; and
checks/versions.json, the versions of the libraries that compute (identity.COMPUTING_LIBRARIES), a dependency of
every stage that computes: another torch or diffusers reruns them, as it restarts training from scratch.
"""

import _src  # noqa: F401 (first: this checkout's src/, see stages/_src.py)

from scratch_diffusion import tracking
from scratch_diffusion.config import ParamsError, load_params
from scratch_diffusion.data import DataError, source_listing
from scratch_diffusion.files import write_json, write_text
from scratch_diffusion.identity import library_versions
from scratch_diffusion.preflight import DataFacts, check_runnable
from scratch_diffusion.stage import StageError, run_stage

OUT = "checks/params.ok"
SOURCE = "checks/source.json"
VERSIONS = "checks/versions.json"


def main() -> None:
    back = "nothing else ran; back to the last good state: git checkout params.yaml && dvc checkout"
    try:
        params = load_params()
        d = params.data
        try:
            listing = source_listing(d.dataset, d.source, d.channels, d.held_out, d.background)
        except DataError as e:
            raise ParamsError(str(e)) from None
        facts = DataFacts.listed(params, listing) if d.dataset == "folder" else None
        notes = check_runnable(params, facts)
    except ParamsError as e:
        raise ParamsError(f"{e} ({back})") from None
    # The store every later stage logs into: a server that does not answer or refuses the credentials, or a deleted
    # experiment, is said here, before DVC has deleted any stage's outputs (each stage checks again when it starts).
    try:
        tracking.check_experiment(params.mlflow.experiment)
    except (ConnectionError, StageError) as e:
        raise type(e)(f"{e} (nothing else ran)") from None
    if "note" in listing:  # what the folder's layout means, e.g. one class folder read as unlabelled
        notes.insert(0, listing["note"])
    for note in notes:
        print(f"check-params: {note}", flush=True)
    write_json(SOURCE, listing)
    write_json(VERSIONS, library_versions())
    write_text(OUT, "params.yaml is valid\n")


if __name__ == "__main__":
    run_stage(main)
