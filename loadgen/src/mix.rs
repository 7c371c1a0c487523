//! `--segment-mix`: which segment keys votes carry and how often each value comes up.

use rand::Rng;

/// The segment values votes carry when `--segment-mix` is not given: four keys, every
/// value equally likely.
pub const DEFAULT_SEGMENT_MIX: &str =
    "country=US,DE,GB,FR,BR,IN,JP,ES;device=mobile,desktop,tablet;\
     channel=email,social,search,ads;plan=free,pro,enterprise";

/// At most this many segment keys per vote: a vote keeps its pick in a fixed-size array of
/// value indices ([`Pick`]), so making a vote allocates nothing.
pub const MAX_MIX_KEYS: usize = 8;

/// One value index per key of the mix, in the mix's key order (unused slots are 0).
pub type Pick = [u16; MAX_MIX_KEYS];

/// The most values one key of a mix may have: an index fits the `u16` of a [`Pick`].
pub const MAX_MIX_VALUES: usize = u16::MAX as usize;

/// `key=value[:weight],value[:weight],…;key=…` — weights are whole numbers (default 1);
/// `key=*N` is N equally likely values `key-0` … `key-<N-1>` (a dimension of thousands of
/// values, such as a store id). Keys that are not standard segment keys become the load
/// polls' own dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentMix {
    keys: Vec<MixKey>,
}

#[derive(Debug, Clone, PartialEq)]
struct MixKey {
    key: String,
    /// At most [`MAX_MIX_VALUES`].
    values: Vec<String>,
    /// Running sums of the weights, for drawing a value.
    cumulative: Vec<u64>,
}

impl std::str::FromStr for SegmentMix {
    type Err = String;

    fn from_str(spec: &str) -> Result<SegmentMix, String> {
        let mut keys: Vec<MixKey> = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let key = parse_key(part)?;
            if keys.iter().any(|k| k.key == key.key) {
                return Err(format!("`{}` is given twice", key.key));
            }
            keys.push(key);
        }
        if keys.len() > MAX_MIX_KEYS {
            return Err(format!("at most {MAX_MIX_KEYS} segment keys"));
        }
        Ok(SegmentMix { keys })
    }
}

/// One `key=value[:weight],…` part of the spec.
fn parse_key(part: &str) -> Result<MixKey, String> {
    let Some((key, values)) = part.split_once('=') else {
        return Err(format!("`{part}`: expected key=value,value,…"));
    };
    let key = key.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("`{key}`: a segment key is letters, digits and `_`"));
    }
    let mut mix = MixKey {
        key: key.to_owned(),
        values: Vec::new(),
        cumulative: Vec::new(),
    };
    if let Some(count) = values.trim().strip_prefix('*') {
        let count = match count.parse::<usize>() {
            Ok(count) if (1..=MAX_MIX_VALUES).contains(&count) => count,
            _ => {
                return Err(format!(
                    "`{key}=*{count}`: the number of values is a whole number from 1 to {MAX_MIX_VALUES}"
                ))
            }
        };
        mix.values = (0..count).map(|i| format!("{key}-{i}")).collect();
        mix.cumulative = (1..=count as u64).collect();
        return Ok(mix);
    }
    for value in values.split(',').map(str::trim) {
        let (value, weight) = match value.rsplit_once(':') {
            Some((value, weight)) => match weight.parse::<u64>() {
                Ok(weight) if weight > 0 => (value, weight),
                _ => {
                    return Err(format!(
                        "`{key}={value}:{weight}`: a weight is a whole number above 0"
                    ))
                }
            },
            None => (value, 1),
        };
        if value.is_empty() {
            return Err(format!("`{key}` has an empty value"));
        }
        let total = mix.cumulative.last().copied().unwrap_or(0) + weight;
        mix.values.push(value.to_owned());
        mix.cumulative.push(total);
    }
    if mix.values.len() > MAX_MIX_VALUES {
        return Err(format!("`{key}` has more than {MAX_MIX_VALUES} values"));
    }
    Ok(mix)
}

impl SegmentMix {
    /// The keys the load polls must declare: those that are not standard segment keys.
    pub fn dimensions(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.key.as_str())
            .filter(|key| !tally_core::segment::STANDARD_KEYS.contains(key))
            .collect()
    }

    /// Draws one value per key, each as often as its weight says.
    pub fn pick(&self, rng: &mut impl Rng) -> Pick {
        let mut picked = [0; MAX_MIX_KEYS];
        for (slot, key) in picked.iter_mut().zip(&self.keys) {
            let total = key.cumulative.last().copied().unwrap_or(1);
            let draw = rng.random_range(0..total);
            *slot = key.cumulative.partition_point(|&sum| sum <= draw) as u16;
        }
        picked
    }

    /// How many keys the mix has (a pick's first slots).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The key at `slot` and its value at `value` (indices of a pick).
    pub fn value(&self, slot: usize, value: u16) -> (&str, &str) {
        let key = &self.keys[slot];
        (key.key.as_str(), key.values[usize::from(value)].as_str())
    }

    /// The (key, value) pairs of a pick.
    pub fn values<'a>(&'a self, picked: &'a Pick) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.keys
            .iter()
            .zip(picked)
            .map(|(key, &i)| (key.key.as_str(), key.values[usize::from(i)].as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_default_mix_has_four_keys_and_one_own_dimension() {
        let mix: SegmentMix = DEFAULT_SEGMENT_MIX.parse().expect("default mix");
        let keys: Vec<&str> = mix.keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["country", "device", "channel", "plan"]);
        assert_eq!(mix.dimensions(), ["plan"]);
        assert_eq!(mix.keys[0].values.len(), 8);
    }

    #[test]
    fn values_come_up_as_often_as_their_weights_say() {
        let mix: SegmentMix = "country=US:3,DE;plan=pro".parse().expect("mix");
        assert_eq!(mix.keys[0].cumulative, [3, 4]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let draws = 20_000;
        let us = (0..draws)
            .filter(|_| {
                let picked = mix.pick(&mut rng);
                let values: Vec<(&str, &str)> = mix.values(&picked).collect();
                assert_eq!(values[1], ("plan", "pro"));
                values[0].1 == "US"
            })
            .count();
        let share = us as f64 / draws as f64;
        assert!(
            (0.72..0.78).contains(&share),
            "US came up {share} of the time, not 3/4"
        );
    }

    #[test]
    fn a_counted_key_has_that_many_equally_likely_values() {
        let mix: SegmentMix = "country=US;store=*10000".parse().expect("mix");
        assert_eq!(mix.dimensions(), ["store"]);
        assert_eq!(mix.keys[1].values.len(), 10_000);
        assert_eq!(mix.keys[1].values[9_999], "store-9999");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seen: std::collections::BTreeSet<String> = (0..200_000)
            .map(|_| {
                let picked = mix.pick(&mut rng);
                let store = mix.values(&picked).nth(1).expect("a store").1.to_owned();
                store
            })
            .collect();
        assert!(seen.len() > 9_900, "{} stores came up", seen.len());
    }

    #[test]
    fn a_bad_mix_is_refused_with_what_to_fix() {
        for (spec, says) in [
            ("country", "expected key=value"),
            ("country=US:0", "whole number above 0"),
            ("country=US:x", "whole number above 0"),
            ("coun try=US", "letters, digits"),
            ("country=US;country=DE", "given twice"),
            ("country=US,,DE", "empty value"),
            ("a=1;b=1;c=1;d=1;e=1;f=1;g=1;h=1;i=1", "at most 8"),
            ("store=*0", "from 1 to 65535"),
            ("store=*70000", "from 1 to 65535"),
            ("store=*x", "from 1 to 65535"),
        ] {
            let err = spec.parse::<SegmentMix>().expect_err(spec);
            assert!(err.contains(says), "{spec}: {err}");
        }
    }
}
