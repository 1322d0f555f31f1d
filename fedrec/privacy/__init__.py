"""User-level privacy: clipping (`clipping`), what the server does to a round's sum
(`mechanism`: no privacy, or the Gaussian mechanism with adaptive clipping as a part), and
the accountants that turn the rounds into ε (`accountant`, one registry). Sample-level
DP-SGD for silos trains inside `fedrec.train.dpsgd`."""
