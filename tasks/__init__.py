"""SeqIO Task and Mixture registrations for GenSAR (search, recommendation, alignment)."""
