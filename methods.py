"""Every --method, and the one function that sets it up (method.py's contract: setup(model, cfg, task)).

train.py and transfer.py set methods up through METHODS; train_seg.py through SEGMENTATION, which
takes R-Adapter's and LoRA's from here and adds CAT-Seg's own choices of what of CLIP trains.
"""

import baselines
import clipfit
import lora
import prompt_learners
import r_adapter
import segment
import ssf

METHODS = {
    "r-adapter": r_adapter.setup,  # adapters, dropping, EMA, merged at alpha (Kim et al., ECCV 2024)
    "lora": lora.setup,  # low-rank updates of qkv and W_O, merged (Hu et al., ICLR 2022)
    "ssf": ssf.setup,  # per-channel scale and shift, merged (Lian et al., NeurIPS 2022)
    "clipfit": clipfit.setup,  # text FFN biases + image LayerNorms (Li et al., EMNLP 2024)
    "coop": prompt_learners.setup,  # learned prompt context (Zhou et al., IJCV 2022)
    "cocoop": prompt_learners.setup,  # ... shifted per image by a meta-net (Zhou et al., CVPR 2022)
    "full-ft": baselines.setup_full_ft,  # WiSE-FT's end-to-end fine-tuning (Wortsman et al., CVPR 2022)
    "wise-ft": baselines.setup_full_ft,  # ... its weights interpolated with zero-shot's at alpha
    "flyp": baselines.setup_flyp,  # contrastive full fine-tuning (Goyal et al., CVPR 2023)
    "linear-probe": baselines.setup_linear_probe,  # a zero-shot-initialised head on the frozen tower
    "prolip": baselines.setup_prolip,  # only the visual projection (Fahes et al., 2024)
    "zero-shot": baselines.setup_zero_shot,  # nothing trains
}

SEGMENTATION = {  # train_seg.py: what of CLIP trains (the CAT-Seg head always trains)
    "frozen": baselines.setup_zero_shot,  # nothing
    "catseg": segment.setup_catseg,  # W_q and W_v of every block of both towers (CAT-Seg's default)
    "full": baselines.setup_flyp,  # every weight but the logit scale
    "r-adapter": r_adapter.setup,
    "lora": lora.setup,
}
