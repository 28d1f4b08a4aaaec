"""Online KTO: sample from the policy, label the samples with reward functions, train with the KTO loss."""
