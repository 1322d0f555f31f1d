"""Training and evaluation of the recommender: batches (`batches`), the per-user engine
(`loop`), the vectorized cohort engine (`vectorized`), silo DP-SGD (`dpsgd`), the choice
between them (`engine`), full-ranking evaluation (`evaluate`) and centralized training
(`pretrain`). Modules import down this list only; nothing here imports the package itself."""
