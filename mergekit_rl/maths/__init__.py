"""The weight arithmetic as pure functions on tensors: no files, no network, no devices chosen.

`task_vectors` holds τ = θ_ft − θ_base and θ = θ_target + α·τ; `merge_methods` holds mergekit's
methods (task arithmetic, TIES, DARE, breadcrumbs, linear). The engine streams blocks of tensors
through these functions; tests check them against hand-worked values and mergekit's own code.
"""
