"""Front ends: other ways of saying a policy (Istio's configuration, pod annotations, policy files)."""
