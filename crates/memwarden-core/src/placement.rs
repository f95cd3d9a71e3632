//! The placement rule, pure: among candidate devices, the one with the most room. The daemon's
//! placement room applies it to an allocation that names no device; the rebalance advice
//! applies it to find where a model from a full GPU would go.

/// The candidate with the most available bytes; the first one on a tie, `None` when there is
/// no candidate.
pub fn roomiest<D>(candidates: impl IntoIterator<Item = (D, u64)>) -> Option<D> {
    let mut best: Option<(D, u64)> = None;
    for (device, available_bytes) in candidates {
        if best.as_ref().is_none_or(|(_, b)| available_bytes > *b) {
            best = Some((device, available_bytes));
        }
    }
    best.map(|(device, _)| device)
}

#[cfg(test)]
mod tests {
    use super::roomiest;

    #[test]
    fn the_roomiest_wins_and_the_first_on_a_tie() {
        assert_eq!(roomiest([("a", 5), ("b", 9), ("c", 9), ("d", 1)]), Some("b"));
        assert_eq!(roomiest([("a", 0)]), Some("a"));
        assert_eq!(roomiest(Vec::<(&str, u64)>::new()), None);
    }
}
