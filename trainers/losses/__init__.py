"""Losses as pure functions of tensors: no models, no I/O, no distributed calls.

`policy` holds the SFT / C-RLFT cross-entropy and GRPO's advantages, k3 KL and clipped-ratio
loss; `preference` the DPO family (sigmoid, robust, IPO, hinge, CoPG) and WPO's weights.
"""
