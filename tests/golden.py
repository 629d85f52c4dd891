"""Run a golden file (the paper authors' trajectories) through sambayes and measure the error."""

import torch
from conftest import GoldenMLP, load_golden

import sambayes


def golden_errors(name: str, backend: str, dtype=torch.float64, device="cpu") -> dict[str, float]:
    """Max abs error over all steps and parameters for each state field, and for the loss.

    Noise vanishes with num_data = 1e30 (sigma ~ 1e-15), as ALGORITHM.md prescribes.
    """
    golden = load_golden(name)
    hyper = golden["hyper"]
    model = GoldenMLP(golden["init"], dtype=dtype, device=device)
    x = torch.tensor(golden["data"]["x"], dtype=dtype, device=device)
    y = torch.tensor(golden["data"]["y"], device=device)
    splits = hyper["msharpness"]
    if golden["optimizer"] == "bsam":
        opt = sambayes.BSAM(
            model.parameters(),
            num_data=1e30,
            lr=hyper["lr"],
            betas=(hyper["beta1"], hyper["beta2"]),
            rho=hyper["rho"],
            weight_decay=hyper["weight_decay"],
            damping=hyper["damping"],
            init_precision=hyper["init_precision"],
            seed=0,
            backend=backend,
        )
        fields = {"mean": "mean", "momentum": "momentum", "precision": "precision"}
    else:
        opt = sambayes.SAM(
            model.parameters(),
            lr=hyper["lr"],
            momentum=hyper["momentum"],
            rho=hyper["rho"],
            weight_decay=hyper["weight_decay"],
            backend=backend,
        )
        fields = {"mean": "weight", "momentum": "momentum"}
    errors = dict.fromkeys([*fields, "loss", "params"], 0.0)
    for batch, factor, expected in zip(golden["batches"], golden["lr_factor"], golden["trajectory"]):
        for group in opt.param_groups:
            group["lr"] = hyper["lr"] * factor
        chunks = sambayes.split_batch(x[batch], y[batch], splits=splits)

        def closure(j=0):
            xb, yb = chunks[j]
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        loss = opt.step(closure, splits=splits)
        errors["loss"] = max(errors["loss"], abs(loss.item() - expected["loss"]))
        for pname, p in model.named_parameters():
            for field, key in fields.items():
                ref = torch.tensor(expected[field][pname], dtype=torch.float64)
                got = opt.state[p][key].double().cpu()
                errors[field] = max(errors[field], (got - ref).abs().max().item())
            ref = torch.tensor(expected["mean"][pname], dtype=torch.float64)
            errors["params"] = max(errors["params"], (p.detach().double().cpu() - ref).abs().max().item())
    return errors
