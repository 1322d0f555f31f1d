"""Training and evaluation of the recommender: what the engines are told (`settings`),
batches (`batches`), the per-user engine (`loop`); the vectorized cohort engine in its parts,
per-user dropout (`dropout`), the stacked forward (`stacked`), the fused scoring layer
(`scoring`), grouping and per-user state (`groups`), the stacked step (`step`), clipping and
accumulation (`accumulate`), the one-step shared-table path (`shared_table`) and its driver
(`vectorized`); silo DP-SGD (`dpsgd`), the choice between the engines (`engine`),
full-ranking evaluation (`evaluate`) and centralized training (`pretrain`). Modules import
down this list only; nothing here imports the package itself."""
