"""Profiles (``profile=faithful|standard|quick|smoke``) applied in one place.

faithful runs the reports' sizes. standard and quick scale no step count, chain or stop rule
(step_scale, train_scale and sample_step_scale 1, min_steps 1): they cap image sides (64 | 32)
and their presets shrink what a CPU cannot afford (R5's training set and eps-net; quick's are
smaller and train R5 at lr 2e-3). smoke cuts steps and chains to seconds per run.

``apply_profile(cfg) -> cfg`` is called once per job, before validation; a method reads
sizes and step counts that already have the profile's values. With s = profile.step_scale
and m = profile.min_steps it:

- merges ``<group>.at_profile[profile.name]`` over the data, the backbone, the eps-net and the
  method and removes ``at_profile`` (a preset key wins over the same key set on the command line);
- caps an image's side (``data.size``, data=image) at ``profile.max_size`` (or the backbone's own
  ``max_side`` when that is smaller, e.g. SegNet's standard preset), moved to the nearest side the
  backbone accepts;
- scales DIP epoch plans: constant / list ``epoch_plan.steps`` -> max(m, round(steps * s));
  softmax_beta ``epoch_plan.total`` -> max(1, round(total * s)), each stage then at least
  ``epoch_plan.min_steps`` = max(its own, m) (a total of 0 or 1 splits alike: all to the floor);
- scales the diffusion methods' sizes (``_DIFFUSION``), with r = profile.train_scale and
  c = profile.sample_step_scale (missing or null: 1.0):

  ============== ===================== ===================================================
  method         key                   under the profile
  ============== ===================== ===================================================
  all three      method.dip.steps      max(m, round(steps * s)); ddpm_dataset: at most
                                       steps, at least method.dip.min_steps (null: R5's
                                       5 | 1000 by dip_mode; dip_mode none: not scaled)
  ddpm_single    method.train          max(1, round(iterations * r)) (null: R3's 3000 |
                 .iterations           5000 by x0_source)
  ddpm_single    method.sample.calls   min(top + 1, max(1, round(calls * c))), top =
                                       min(sample.t_start, T - 1)
  ddpm_single    method.sample.t_start with calls null: max(1, round((top + 1) * c)) - 1
                                       (the chain starts lower, every timestep)
  ddpm_dipnoise  method.steps          min(steps, max(1, round(steps * c))) (steps <= T and
                                       sample.t_start null or >= steps - 1, else as written)
  ddpm_dipnoise, method.train.epochs   epochs * r (a fraction; whole numbers stay ints)
  ddpm_dataset
  ddpm_dataset   method.sample.calls   null: min(T, max(m, round(T * s))) (R5 shortens
                                       its chain by step_scale)
  ============== ===================== ===================================================

  T is scheduler.num_timesteps. A key is written only when the profile changes the value the
  method would use (a null stays null under faithful), so a method reads its sizes as they
  are; its own floor ``method.train.min_iterations`` applies to the iterations it derives
  (epochs * ceil(N / batch_size) depends on the data). Whole-number products keep their
  float order: epochs * r * ceil(N / batch) rounds like R4's and R5's iterations always did
  (tests/test_profile.py checks every experiment and sweep point).

Values that are not valid are left as written, so validation names them unchanged.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dipddpm.errors import is_number, require

MERGED_GROUPS = ("data", "backbone", "eps_net", "method")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def scaled_steps(steps: int, step_scale: float, min_steps: int) -> int:
    """A step count under a profile: max(min_steps, round(steps * step_scale))."""
    return max(int(min_steps), int(round(steps * step_scale)))


def preset_merged(group: dict, key: str, profile_name: str | None) -> dict:
    """``group`` with ``group['at_profile'][profile_name]`` merged over it (nested keys merge) and
    ``at_profile`` removed. A preset key the group does not have is a ConfigError naming
    ``<key>.at_profile.<profile_name>``."""
    group = dict(group)
    presets = group.pop("at_profile", None) or {}
    require(isinstance(presets, dict), f"{key}.at_profile", presets, f"a mapping from profile name to {key} keys")
    preset = presets.get(profile_name) or {}
    require(isinstance(preset, dict), f"{key}.at_profile.{profile_name}", preset, f"a mapping of {key} keys")

    def merge(base: dict, update: dict, where: str) -> dict:
        unknown = sorted(set(update) - set(base))
        require(not unknown, where, unknown, f"keys of the {key} config: " + ", ".join(map(str, base)))
        out = dict(base)
        for name, value in update.items():
            nested = isinstance(value, dict) and isinstance(base[name], dict)
            out[name] = merge(base[name], value, where) if nested else value
        return out

    return merge(group, preset, f"{key}.at_profile.{profile_name}")


def _capped_size(cfg) -> int | None:
    """The image side under profile.max_size, raised to what the backbone accepts; None: no cap applies."""
    from dipddpm.models import size_requirement

    size, max_size = cfg["data"].get("size"), cfg["profile"].get("max_size")
    if cfg.get("backbone") is None:
        return None
    own = cfg["backbone"].get("max_side")
    if own is not None:
        require(_is_int(own) and own >= 1, "backbone.max_side", own, "null or an integer >= 1")
        max_size = own if max_size is None else min(max_size, own)
    if max_size is None:
        return None
    require(_is_int(max_size) and max_size >= 1, "profile.max_size", max_size, "null or an integer >= 1")
    if not (size is None or (_is_int(size) and size > max_size)):
        return None
    multiple, minimum = size_requirement(OmegaConf.create(cfg["backbone"]))
    capped = max(minimum, (max_size // multiple) * multiple)
    if size is None:
        return capped
    return min(size, capped) if min(size, capped) >= minimum else minimum


def _scale_epoch_plan(plan: dict, step_scale: float, min_steps: int) -> None:
    name = plan.get("name")
    steps = plan.get("steps")
    if name == "constant" and _is_int(steps) and steps >= 1:
        plan["steps"] = scaled_steps(steps, step_scale, min_steps)
    elif name == "list" and isinstance(steps, list) and all(_is_int(n) and n >= 1 for n in steps):
        plan["steps"] = [scaled_steps(n, step_scale, min_steps) for n in steps]
    elif name == "softmax_beta":
        total = plan.get("total")
        if _is_int(total) and total >= 1:
            plan["total"] = max(int(round(total * step_scale)), 1)
        floor = plan.get("min_steps", 1)
        if _is_int(floor):
            plan["min_steps"] = max(floor, min_steps)


def _is_count(value, minimum: int = 1) -> bool:
    return _is_int(value) and value >= minimum


def _is_positive(value) -> bool:
    return is_number(value) and value > 0


def _chain_scale(profile: dict) -> float:
    return float(profile.get("sample_step_scale") or 1.0)


def _set(node: dict, key: str, scaled, current) -> None:
    """``node[key] = scaled`` when it changes what the method would use (``current``)."""
    if scaled != current:
        node[key] = scaled


def _scaled_epochs(epochs, train_scale: float):
    """epochs * train_scale, an int when whole (so R4/R5's epochs * ceil(N / batch) is unchanged)."""
    scaled = epochs * train_scale
    return int(scaled) if float(scaled).is_integer() else scaled


def _scale_ddpm_single(method: dict, profile: dict, num_timesteps) -> None:
    from dipddpm.methods.ddpm_single import DEFAULT_ITERATIONS

    step_scale, min_steps = profile["step_scale"], profile["min_steps"]
    dip, train, sample = method.get("dip", {}), method.get("train", {}), method.get("sample", {})
    if _is_count(dip.get("steps")):
        dip["steps"] = scaled_steps(dip["steps"], step_scale, min_steps)
    iterations = train.get("iterations")
    if iterations is None:
        iterations = DEFAULT_ITERATIONS.get(method.get("x0_source"))
    if _is_count(iterations):
        _set(train, "iterations", max(1, int(round(iterations * profile["train_scale"]))), iterations)
    t_start, calls = sample.get("t_start"), sample.get("calls")
    if not (_is_count(t_start, 0) and _is_count(num_timesteps)):
        return
    top = min(t_start, num_timesteps - 1)
    if calls is None:
        chain = min(max(1, int(round((top + 1) * _chain_scale(profile)))), top + 1)
        _set(sample, "t_start", chain - 1, top)
    elif _is_count(calls) and calls <= top + 1:
        sample["calls"] = min(max(1, int(round(calls * _chain_scale(profile)))), top + 1)


def _scale_ddpm_dipnoise(method: dict, profile: dict, num_timesteps) -> None:
    dip, train = method.get("dip", {}), method.get("train", {})
    if _is_count(dip.get("steps")):
        dip["steps"] = scaled_steps(dip["steps"], profile["step_scale"], profile["min_steps"])
    steps, t_start = method.get("steps"), method.get("sample", {}).get("t_start")
    valid = _is_count(steps) and (not _is_count(num_timesteps) or steps <= num_timesteps)
    if valid and (t_start is None or (_is_int(t_start) and t_start >= steps - 1)):
        method["steps"] = min(max(1, int(round(steps * _chain_scale(profile)))), steps)
    if _is_positive(train.get("epochs")):
        train["epochs"] = _scaled_epochs(train["epochs"], profile["train_scale"])


def _scale_ddpm_dataset(method: dict, profile: dict, num_timesteps) -> None:
    from dipddpm.methods.ddpm_dataset import DEFAULT_DIP_STEPS

    step_scale, min_steps = profile["step_scale"], profile["min_steps"]
    dip, train, sample = method.get("dip", {}), method.get("train", {}), method.get("sample", {})
    steps = dip.get("steps")
    if steps is None:
        steps = DEFAULT_DIP_STEPS.get(method.get("dip_mode"))
    if _is_count(steps) and _is_count(dip.get("min_steps")):
        _set(dip, "steps", min(steps, max(scaled_steps(steps, step_scale, min_steps), dip["min_steps"])), steps)
    if _is_positive(train.get("epochs")):
        train["epochs"] = _scaled_epochs(train["epochs"], profile["train_scale"])
    if sample.get("calls") is None and _is_count(num_timesteps):
        _set(sample, "calls", min(num_timesteps, scaled_steps(num_timesteps, step_scale, min_steps)), num_timesteps)


# method name -> the function scaling its sizes in place: (method config, profile, T or None)
_DIFFUSION = {"ddpm_single": _scale_ddpm_single, "ddpm_dipnoise": _scale_ddpm_dipnoise,
              "ddpm_dataset": _scale_ddpm_dataset}


def apply_profile(cfg: DictConfig) -> DictConfig:
    """A resolved copy of the composed config with the profile applied (see the module docstring);
    ``profile.applied`` is true in it, and a config already applied is returned as it is.
    Raises ConfigError for unusable profile values or presets."""
    if cfg.profile.get("applied"):
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    profile = plain["profile"]
    step_scale, min_steps = profile.get("step_scale", 1.0), profile.get("min_steps", 1)
    require(is_number(step_scale) and step_scale > 0, "profile.step_scale", step_scale, "a number > 0")
    require(_is_int(min_steps) and min_steps >= 1, "profile.min_steps", min_steps, "an integer >= 1")
    for key in MERGED_GROUPS:
        if isinstance(plain.get(key), dict):
            plain[key] = preset_merged(plain[key], key, profile.get("name"))
    if isinstance(plain.get("data"), dict) and plain["data"].get("name") == "image":
        capped = _capped_size(plain)
        if capped is not None:
            plain["data"]["size"] = capped
    if isinstance(plain.get("epoch_plan"), dict):
        _scale_epoch_plan(plain["epoch_plan"], float(step_scale), int(min_steps))
    method = plain.get("method")
    if isinstance(method, dict) and method.get("name") in _DIFFUSION:
        train_scale, chain_scale = profile.get("train_scale", 1.0), profile.get("sample_step_scale")
        require(is_number(train_scale) and train_scale > 0, "profile.train_scale", train_scale, "a number > 0")
        require(chain_scale is None or (is_number(chain_scale) and chain_scale > 0), "profile.sample_step_scale",
                chain_scale, "null or a number > 0")
        scales = {"step_scale": float(step_scale), "min_steps": int(min_steps), "train_scale": float(train_scale),
                  "sample_step_scale": chain_scale}
        num_timesteps = (plain.get("scheduler") or {}).get("num_timesteps")
        _DIFFUSION[method["name"]](method, scales, num_timesteps)
    profile["applied"] = True
    out = OmegaConf.create(plain)
    OmegaConf.set_struct(out, True)
    return out
