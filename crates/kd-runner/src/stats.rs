//! The paired t-test of the report: does a method beat the baseline trained with the same seeds?
//!
//! A seed fixes data order, augmentation and initialisation, so a method's run and the
//! baseline's run with one seed share everything but the method: their difference is the
//! method's effect plus noise, and the differences over seeds are what the test looks at. The
//! two-sided p-value comes from Student's t distribution with n − 1 degrees of freedom, through
//! the regularised incomplete beta function (continued fraction, Lentz's method).

/// What [`paired_t_test`] returns.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedTest {
    /// Pairs (seeds present on both sides).
    pub n: usize,
    /// Mean of the differences `a − b`.
    pub mean: f64,
    /// t statistic: the mean over its standard error.
    pub t: f64,
    /// Two-sided p-value at n − 1 degrees of freedom.
    pub p: f64,
}

/// The paired t-test of `a` against `b` (same length, element i of both from one seed). `None`
/// with fewer than two pairs, or when the differences do not vary (no standard error).
pub fn paired_t_test(a: &[f64], b: &[f64]) -> Option<PairedTest> {
    assert_eq!(a.len(), b.len(), "paired samples of different lengths");
    let n = a.len();
    if n < 2 {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    if se == 0.0 || !se.is_finite() {
        return None;
    }
    let t = mean / se;
    Some(PairedTest {
        n,
        mean,
        t,
        p: t_two_sided_p(t, (n - 1) as f64),
    })
}

/// P(|T| ≥ |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2).
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if t.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
}

/// The regularised incomplete beta function I_x(a, b), for 0 ≤ x ≤ 1 and a, b > 0.
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The continued fraction converges fast for x < (a + 1)/(a + b + 2); else use the symmetry
    // I_x(a, b) = 1 − I_{1−x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_fraction(1.0 - x, b, a) / b
    }
}

/// The continued fraction of I_x(a, b) (modified Lentz's method).
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // Even step.
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        // Odd step.
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine coefficients: about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    #[test]
    fn p_values_match_the_closed_forms_of_one_and_two_degrees_of_freedom() {
        for t in [0.0, 0.3, 1.0, 2.5, 7.0, 40.0] {
            // df = 1 is the Cauchy distribution: P(|T| ≥ t) = 1 − (2/π)·atan t.
            let cauchy = 1.0 - 2.0 / PI * f64::atan(t);
            assert!(
                (t_two_sided_p(t, 1.0) - cauchy).abs() < 1e-12,
                "df 1, t {t}"
            );
            // df = 2: P(|T| ≥ t) = 1 − t/√(2 + t²).
            let two = 1.0 - t / (2.0 + t * t).sqrt();
            assert!((t_two_sided_p(t, 2.0) - two).abs() < 1e-12, "df 2, t {t}");
            assert_eq!(t_two_sided_p(-t, 2.0), t_two_sided_p(t, 2.0));
        }
    }

    #[test]
    fn p_values_match_the_tabled_critical_values() {
        // Two-sided 5% and 1% critical values of Student's t (any statistics table).
        for (t, df, p) in [
            (2.776_445, 4.0, 0.05),
            (4.604_095, 4.0, 0.01),
            (2.228_139, 10.0, 0.05),
            (2.042_272, 30.0, 0.05),
            (1.959_964, 1e7, 0.05), // the normal limit
        ] {
            let got = t_two_sided_p(t, df);
            assert!((got - p).abs() < 2e-6, "t {t}, df {df}: p {got}, want {p}");
        }
        assert_eq!(t_two_sided_p(f64::INFINITY, 3.0), 0.0);
        assert!(t_two_sided_p(f64::NAN, 3.0).is_nan());
    }

    #[test]
    fn ln_gamma_matches_factorials_and_the_half_integer() {
        let mut fact = 1.0f64;
        for n in 1..20 {
            // Γ(n) = (n − 1)!
            assert!((ln_gamma(n as f64) - fact.ln()).abs() < 1e-10, "Γ({n})");
            fact *= n as f64;
        }
        assert!((ln_gamma(0.5) - PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn paired_test_of_a_constant_shift_plus_noise() {
        let b = [57.95, 59.70, 60.03, 59.37, 58.98];
        let d = [2.70, 1.09, 1.59, 1.77, 2.18];
        let a: Vec<f64> = b.iter().zip(d).map(|(b, d)| b + d).collect();
        let r = paired_t_test(&a, &b).unwrap();
        // mean 1.866, sample std 0.6086, se 0.2722 → t 6.856; p from the closed form at four
        // degrees of freedom: P(|T| ≥ t) = 1 − t·(s + 2)/(s·√s), s = 4 + t².
        let t = r.t;
        let s = 4.0 + t * t;
        let closed = 1.0 - t * (s + 2.0) / (s * s.sqrt());
        assert_eq!(r.n, 5);
        assert!((r.mean - 1.866).abs() < 1e-9);
        assert!((t - 6.856).abs() < 1e-3, "t {t}");
        assert!((r.p - closed).abs() < 1e-12, "p {} vs {closed}", r.p);
        assert!(r.p > 0.002 && r.p < 0.003, "p {}", r.p);
        // Fewer than two pairs, or differences that do not vary: no test.
        assert_eq!(paired_t_test(&[1.0], &[0.0]), None);
        assert_eq!(paired_t_test(&[2.0, 3.0], &[1.0, 2.0]), None);
    }
}
