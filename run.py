"""fewstep entry point:  python run.py [group=option ...] [key=value ...]   (add -m for a sweep)

    python run.py                                     # DPM-Solver++ 10 NFE on the shipped Fashion-MNIST model
    python run.py sampler=dpmpp skip.rho_bottom=0.7   # with Skip-Tuning
    python run.py -m sampler=ddim,dpmpp sampler.steps=5,10
"""
import hydra

import fewstep.config  # noqa: F401  (registers the ${repo:...} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from fewstep.tasks import dispatch

    return dispatch(cfg)


if __name__ == "__main__":
    main()
