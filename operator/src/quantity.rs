//! Kubernetes resource quantities (`5Gi`, `500M`, `1.5Ti`, `1e9`) as byte counts, so the
//! operator can tell whether a data volume must grow.
//!
//! Only what a storage size can be is supported: a non-negative decimal number with an
//! optional binary (`Ki` … `Ei`) or decimal (`k` … `E`) suffix or exponent. Milli-units
//! (`m`) make no sense for bytes and are refused.

/// A quantity that is not a storage size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a storage size (e.g. 10Gi, 500M, 1e9)")]
pub struct InvalidQuantity(pub String);

/// Bytes of a storage quantity, rounded up to whole bytes.
pub fn bytes(quantity: &str) -> Result<u128, InvalidQuantity> {
    let invalid = || InvalidQuantity(quantity.to_owned());
    let text = quantity.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 10_u128.pow(3),
        "M" => 10_u128.pow(6),
        "G" => 10_u128.pow(9),
        "T" => 10_u128.pow(12),
        "P" => 10_u128.pow(15),
        "E" => 10_u128.pow(18),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: u32 = exponent[1..].parse().map_err(|_| invalid())?;
            10_u128.checked_pow(power).ok_or_else(invalid)?
        }
        _ => return Err(invalid()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid());
    }
    let digits = |s: &str| -> Result<u128, InvalidQuantity> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse().map_err(|_| invalid())
        }
    };
    let scale = 10_u128
        .checked_pow(u32::try_from(fraction.len()).map_err(|_| invalid())?)
        .ok_or_else(invalid)?;
    let numerator = digits(whole)?
        .checked_mul(scale)
        .and_then(|w| w.checked_add(digits(fraction).ok()?))
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(invalid)?;
    Ok(numerator.div_ceil(scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_exponent_suffixes() {
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("1024Mi"), bytes("1Gi"));
        assert_eq!(bytes("5G"), Ok(5_000_000_000));
        assert_eq!(bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes("123"), Ok(123));
        assert_eq!(bytes("0.5k"), Ok(500));
        assert_eq!(bytes(".5Ki"), Ok(512));
        assert_eq!(bytes("1.0001"), Ok(2), "rounded up to whole bytes");
    }

    #[test]
    fn ordering_across_units() {
        assert!(bytes("2Gi").unwrap() > bytes("2G").unwrap());
        assert!(bytes("10Gi").unwrap() > bytes("9999Mi").unwrap());
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in ["", "Gi", "1.2.3Gi", "-1Gi", "500m", "1Zi", "ten", "1e99"] {
            assert!(bytes(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
