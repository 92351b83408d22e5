// SPDX-License-Identifier: GPL-2.0-only
/*
 * KSM and THP splits: KSM frees memory at its own rate and accounts for it.
 *
 * KSM splits a THP to merge one of its subpages.  Since commit b1f202060afe
 * ("mm: remap unused subpages to shared zeropage when splitting isolated
 * thp") such a split can also remap every zero-filled subpage of the THP to
 * the shared zeropage, which frees memory faster than pages_to_scan per
 * sleep_millisecs allows, outside ksm_zero_pages and pages_sharing, and
 * takes away the pages KSM would merge.  The KSM tests in
 * ksm_functional_tests.c map their memory with MADV_NOHUGEPAGE, so none of
 * them splits a THP.
 *
 * This test maps THP-backed memory (half the THPs zero-filled, half mixed:
 * zero-filled and identical non-zero subpages), runs KSM for a bounded
 * number of full scans, once with use_zero_pages=1 and once with
 * use_zero_pages=0, and checks:
 *
 *  1. memory freed never outruns pages_to_scan per sleep_millisecs by more
 *     than MAX_BUDGET_RATIO (use_zero_pages=1; freed = RssAnon drop +
 *     pages_sharing, over any window of at least WINDOW_S);
 *  2. with use_zero_pages=0, merging progresses at KSM's rate: after
 *     FULL_SCANS full scans KSM's account (pages_shared + pages_sharing)
 *     covers at least MIN_MERGED of the duplicate pages;
 *  3. with use_zero_pages=1, the zero pages it frees (RssAnon drop) are
 *     counted in ksm_zero_pages.
 *
 * It needs root, KSM and THP; it saves every knob it writes and puts them
 * back on exit and on a fatal signal.  "# ksmlab: key=value" lines carry
 * the figures for a machine to read.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../kselftest.h"

#define KSM_DIR "/sys/kernel/mm/ksm/"
#define THP_DIR "/sys/kernel/mm/transparent_hugepage/"

#define NR_THPS			16	/* 32 MiB with 2 MiB THPs */
#define PAGES_TO_SCAN		100	/* KSM's defaults */
#define SLEEP_MILLISECS		20
#define FULL_SCANS		4	/* checksum, merge, and slack */
#define PHASE_TIMEOUT_S		120
#define WINDOW_S		0.2
#define MAX_BUDGET_RATIO	2.0
#define MIN_MERGED		0.9
#define SAMPLE_US		10000
#define MAX_SAMPLES		(PHASE_TIMEOUT_S * 1000000 / SAMPLE_US + 16)
#define PATTERN			0x5a

/* Every knob the test may write: saved first, restored last */
struct knob {
	const char *path;
	bool optional;		/* absent on older kernels */
	bool saved;
	char value[64];
};

enum { RUN, ADVISOR_MODE, PAGES_TO_SCAN_KNOB, SLEEP_KNOB, USE_ZERO_PAGES, THP_ENABLED };

/* advisor_mode before pages_to_scan: writing it resets pages_to_scan */
static struct knob knobs[] = {
	[RUN] = { .path = KSM_DIR "run" },
	[ADVISOR_MODE] = { .path = KSM_DIR "advisor_mode", .optional = true },
	[PAGES_TO_SCAN_KNOB] = { .path = KSM_DIR "pages_to_scan" },
	[SLEEP_KNOB] = { .path = KSM_DIR "sleep_millisecs" },
	[USE_ZERO_PAGES] = { .path = KSM_DIR "use_zero_pages" },
	[THP_ENABLED] = { .path = THP_DIR "enabled" },
};

#define NR_KNOBS ARRAY_SIZE(knobs)

struct sample {
	double t;
	long rss_anon;		/* pages */
	long shared, sharing, zero, full_scans;
};

static struct sample samples[2][MAX_SAMPLES];	/* per use_zero_pages */
static size_t pagesize, thpsize;
static bool have_zero_counter;

static ssize_t read_file(const char *path, char *buf, size_t size)
{
	ssize_t n;
	int fd;

	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	return n;
}

/* Async-signal-safe: also used by the signal handler */
static int write_file(const char *path, const char *val)
{
	size_t len = strlen(val);
	ssize_t n;
	int fd;

	fd = open(path, O_WRONLY);
	if (fd < 0)
		return -1;
	n = write(fd, val, len);
	close(fd);
	return n == (ssize_t)len ? 0 : -1;
}

static long read_long(const char *path)
{
	char buf[64];

	if (read_file(path, buf, sizeof(buf)) < 0)
		return -1;
	return strtol(buf, NULL, 10);
}

/* "always [madvise] never" -> "madvise"; a plain value as it is */
static void selected(const char *in, char *out, size_t size)
{
	const char *a = strchr(in, '['), *b = a ? strchr(a, ']') : NULL;
	size_t n;

	if (a && b) {
		in = a + 1;
		n = b - a - 1;
	} else {
		n = strcspn(in, "\n");
	}
	if (n >= size)
		n = size - 1;
	memcpy(out, in, n);
	out[n] = '\0';
}

static void restore_knobs(void)
{
	int i;

	/* run last, so KSM never runs with the test's settings meanwhile */
	for (i = NR_KNOBS - 1; i >= 0; i--)
		if (knobs[i].saved)
			write_file(knobs[i].path, knobs[i].value);
}

static void on_signal(int sig)
{
	restore_knobs();
	signal(sig, SIG_DFL);
	raise(sig);
}

static int save_knobs(void)
{
	static const int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGALRM };
	struct sigaction sa = { .sa_handler = on_signal };
	char buf[256];
	size_t i;

	for (i = 0; i < NR_KNOBS; i++) {
		if (read_file(knobs[i].path, buf, sizeof(buf)) < 0) {
			if (knobs[i].optional)
				continue;
			return -1;
		}
		selected(buf, knobs[i].value, sizeof(knobs[i].value));
		knobs[i].saved = true;
	}
	sigemptyset(&sa.sa_mask);
	for (i = 0; i < ARRAY_SIZE(sigs); i++)
		sigaction(sigs[i], &sa, NULL);
	atexit(restore_knobs);
	return 0;
}

static int set_knob(const char *path, long val)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%ld", val);
	return write_file(path, buf);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long rss_anon_pages(void)
{
	char buf[4096], *p;

	if (read_file("/proc/self/status", buf, sizeof(buf)) < 0)
		return -1;
	p = strstr(buf, "RssAnon:");
	return p ? strtol(p + 8, NULL, 10) * 1024 / (long)pagesize : -1;
}

static void take(struct sample *s, double t0)
{
	s->t = now() - t0;
	s->rss_anon = rss_anon_pages();
	s->shared = read_long(KSM_DIR "pages_shared");
	s->sharing = read_long(KSM_DIR "pages_sharing");
	s->zero = have_zero_counter ? read_long(KSM_DIR "ksm_zero_pages") : 0;
	s->full_scans = read_long(KSM_DIR "full_scans");
}

/* AnonHugePages of the mapping that starts at @addr, in bytes */
static long anon_huge_bytes(char *addr)
{
	char line[256], start[32];
	bool in = false;
	long kb = -1;
	FILE *f;

	f = fopen("/proc/self/smaps", "r");
	if (!f)
		return -1;
	snprintf(start, sizeof(start), "%lx-", (unsigned long)addr);
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, start, strlen(start)))
			in = true;
		else if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb < 0 ? -1 : kb * 1024;
}

/*
 * NR_THPS THPs, aligned: the first half zero-filled, the second half with
 * every odd subpage filled with one pattern and every even one zero.
 */
static char *map_thps(size_t len, char **area, size_t *area_len)
{
	char *mem;
	size_t off;

	*area_len = len + thpsize;
	*area = mmap(NULL, *area_len, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (*area == MAP_FAILED)
		return NULL;
	mem = (char *)(((unsigned long)*area + thpsize - 1) & ~(thpsize - 1));
	if (madvise(mem, len, MADV_HUGEPAGE))
		return NULL;
	for (off = 0; off < len; off += pagesize) {
		bool mixed = off >= len / 2;
		bool odd = (off / pagesize) & 1;

		if (mixed && odd)
			memset(mem + off, PATTERN, pagesize);
		else
			mem[off] = 0;	/* a write fault: a zeroed THP */
	}
	return mem;
}

/* freed pages at sample @i: RssAnon drop + pages_sharing gained */
static long freed(const struct sample *s, int i)
{
	return (s[0].rss_anon - s[i].rss_anon) + (s[i].sharing - s[0].sharing);
}

/* Wait for KSM to drop what it held of a region that was unmapped */
static void settle(void)
{
	long start = read_long(KSM_DIR "full_scans");
	double t0 = now();

	while (read_long(KSM_DIR "full_scans") < start + 2 && now() - t0 < 20)
		usleep(SAMPLE_US);
}

struct phase {
	int use_zero_pages;
	struct sample *s;
	int n;			/* samples taken */
	int scans;		/* full scans completed */
	double seconds;
	long pages;		/* pages mapped */
	long thp_pages;		/* of which in THPs when KSM started */
	const char *skip;	/* why the phase could not run */
};

static void run_phase(struct phase *ph)
{
	size_t len = NR_THPS * thpsize, area_len;
	struct sample *samples = ph->s;
	char *mem, *area;
	double t0;
	int i;

	ph->pages = len / pagesize;
	if (set_knob(KSM_DIR "run", 0) ||
	    set_knob(KSM_DIR "pages_to_scan", PAGES_TO_SCAN) ||
	    set_knob(KSM_DIR "sleep_millisecs", SLEEP_MILLISECS) ||
	    set_knob(KSM_DIR "use_zero_pages", ph->use_zero_pages))
		ksft_exit_fail_msg("writing a KSM knob failed: %s\n", strerror(errno));
	mem = map_thps(len, &area, &area_len);
	if (!mem)
		ksft_exit_fail_msg("mapping the THPs failed: %s\n", strerror(errno));
	ph->thp_pages = anon_huge_bytes(mem) / (long)pagesize;
	if (ph->thp_pages < ph->pages / 2) {
		ph->skip = "fewer than half the pages are in THPs (fragmented memory?)";
		munmap(area, area_len);
		return;
	}
	t0 = now();
	take(&samples[0], t0);
	if (madvise(mem, len, MADV_MERGEABLE))
		ksft_exit_fail_msg("MADV_MERGEABLE failed: %s\n", strerror(errno));
	if (set_knob(KSM_DIR "run", 1))
		ksft_exit_fail_msg("starting KSM failed: %s\n", strerror(errno));
	for (i = 1; i < MAX_SAMPLES; i++) {
		usleep(SAMPLE_US);
		take(&samples[i], t0);
		ph->scans = samples[i].full_scans - samples[0].full_scans;
		if (ph->scans >= FULL_SCANS || samples[i].t > PHASE_TIMEOUT_S)
			break;
	}
	ph->n = i < MAX_SAMPLES ? i + 1 : MAX_SAMPLES;
	ph->seconds = samples[ph->n - 1].t;
	munmap(area, area_len);
	settle();
	set_knob(KSM_DIR "run", 0);
}

/* Largest freed rate over any window of at least WINDOW_S, per budget */
static double peak_budget_ratio(const struct phase *ph, long *peak_pages)
{
	const struct sample *samples = ph->s;
	double budget = PAGES_TO_SCAN * 1000.0 / SLEEP_MILLISECS;	/* pages/s */
	double peak = 0;
	int i, j = 1;

	for (i = 0; i < ph->n; i++) {
		double rate;

		if (j <= i)
			j = i + 1;
		while (j < ph->n && samples[j].t - samples[i].t < WINDOW_S)
			j++;
		if (j >= ph->n)
			break;
		rate = (freed(samples, j) - freed(samples, i)) /
		       (samples[j].t - samples[i].t);
		if (rate > peak) {
			peak = rate;
			*peak_pages = freed(samples, j) - freed(samples, i);
		}
	}
	return peak / budget;
}

static void report_phase(const struct phase *ph)
{
	const struct sample *samples = ph->s;
	const struct sample *e = &samples[ph->n - 1];

	ksft_print_msg("ksmlab: uzp%d.pages=%ld uzp%d.thp_pages=%ld uzp%d.full_scans=%d uzp%d.seconds=%.2f\n",
		       ph->use_zero_pages, ph->pages, ph->use_zero_pages,
		       ph->thp_pages, ph->use_zero_pages, ph->scans,
		       ph->use_zero_pages, ph->seconds);
	ksft_print_msg("ksmlab: uzp%d.freed=%ld uzp%d.rss_drop=%ld uzp%d.pages_sharing=%ld uzp%d.pages_shared=%ld uzp%d.ksm_zero_pages=%ld\n",
		       ph->use_zero_pages, freed(samples, ph->n - 1),
		       ph->use_zero_pages, samples[0].rss_anon - e->rss_anon,
		       ph->use_zero_pages, e->sharing - samples[0].sharing,
		       ph->use_zero_pages, e->shared - samples[0].shared,
		       ph->use_zero_pages, e->zero - samples[0].zero);
}

static void test_rate(const struct phase *ph)
{
	long peak_pages = 0;
	double ratio;

	if (ph->skip) {
		ksft_test_result_skip("memory freed within pages_to_scan per sleep_millisecs: %s\n",
				      ph->skip);
		return;
	}
	ratio = peak_budget_ratio(ph, &peak_pages);
	ksft_print_msg("ksmlab: rate.peak_ratio=%.2f rate.peak_window_pages=%ld rate.budget_pages_s=%d rate.max_ratio=%.1f\n",
		       ratio, peak_pages, PAGES_TO_SCAN * 1000 / SLEEP_MILLISECS,
		       MAX_BUDGET_RATIO);
	if (ratio <= MAX_BUDGET_RATIO)
		ksft_test_result_pass("memory freed within pages_to_scan per sleep_millisecs (use_zero_pages=1): peak %.2fx the budget, at most %.1fx\n",
				      ratio, MAX_BUDGET_RATIO);
	else
		ksft_test_result_fail("memory freed outruns pages_to_scan per sleep_millisecs (use_zero_pages=1): peak %.2fx the budget, at most %.1fx allowed\n",
				      ratio, MAX_BUDGET_RATIO);
}

static void test_merge(const struct phase *ph)
{
	const struct sample *samples = ph->s;
	const struct sample *e;
	long merged, outside;

	if (ph->skip) {
		ksft_test_result_skip("merging progresses at KSM's rate: %s\n", ph->skip);
		return;
	}
	e = &samples[ph->n - 1];
	merged = (e->shared - samples[0].shared) + (e->sharing - samples[0].sharing);
	outside = samples[0].rss_anon - e->rss_anon;
	ksft_print_msg("ksmlab: merge.merged=%ld merge.pages=%ld merge.freed_outside_ksm=%ld merge.full_scans=%d merge.min_fraction=%.2f\n",
		       merged, ph->pages, outside, ph->scans, MIN_MERGED);
	if (ph->scans < FULL_SCANS)
		ksft_test_result_fail("merging does not progress at KSM's rate (use_zero_pages=0): %d of %d full scans in %d s\n",
				      ph->scans, FULL_SCANS, PHASE_TIMEOUT_S);
	else if (merged >= MIN_MERGED * ph->pages)
		ksft_test_result_pass("merging progresses at KSM's rate (use_zero_pages=0): %ld of %ld duplicate pages merged in %d full scans\n",
				      merged, ph->pages, ph->scans);
	else
		ksft_test_result_fail("merging does not progress at KSM's rate (use_zero_pages=0): %ld of %ld duplicate pages merged in %d full scans, %ld freed outside KSM\n",
				      merged, ph->pages, ph->scans, outside);
}

static void test_zero_counted(const struct phase *ph)
{
	const struct sample *samples = ph->s;
	const struct sample *e;
	long dropped, counted, slack;

	if (ph->skip) {
		ksft_test_result_skip("zero pages freed are counted in ksm_zero_pages: %s\n",
				      ph->skip);
		return;
	}
	if (!have_zero_counter) {
		ksft_test_result_skip("zero pages freed are counted in ksm_zero_pages: this kernel has no ksm_zero_pages\n");
		return;
	}
	e = &samples[ph->n - 1];
	dropped = samples[0].rss_anon - e->rss_anon;
	counted = e->zero - samples[0].zero;
	slack = ph->pages / 100 + 8;
	if (dropped <= slack) {
		ksft_test_result_skip("zero pages freed are counted in ksm_zero_pages: no zero page was freed (%ld)\n",
				      dropped);
		return;
	}
	if (dropped <= counted + slack)
		ksft_test_result_pass("zero pages freed are counted in ksm_zero_pages (use_zero_pages=1): %ld freed, %ld counted\n",
				      dropped, counted);
	else
		ksft_test_result_fail("zero pages freed are not counted in ksm_zero_pages (use_zero_pages=1): %ld freed, %ld counted\n",
				      dropped, counted);
}

int main(void)
{
	struct phase uzp1 = { .use_zero_pages = 1, .s = samples[1] };
	struct phase uzp0 = { .use_zero_pages = 0, .s = samples[0] };
	char buf[256], thp[64];

	ksft_print_header();
	ksft_set_plan(3);
	pagesize = getpagesize();

	if (access(KSM_DIR "run", F_OK))
		ksft_exit_skip("KSM is not available (CONFIG_KSM)\n");
	if (access(THP_DIR "enabled", F_OK))
		ksft_exit_skip("THP is not available (CONFIG_TRANSPARENT_HUGEPAGE)\n");
	if (geteuid())
		ksft_exit_skip("needs root to set the KSM and THP knobs\n");
	thpsize = read_long(THP_DIR "hpage_pmd_size");
	if ((long)thpsize <= 0)
		ksft_exit_skip("THP size unknown (%s)\n", THP_DIR "hpage_pmd_size");
	have_zero_counter = !access(KSM_DIR "ksm_zero_pages", F_OK);
	if (save_knobs())
		ksft_exit_fail_msg("reading the KSM and THP knobs failed\n");
	alarm(2 * PHASE_TIMEOUT_S + 120);	/* restores the knobs, then dies */

	if (knobs[ADVISOR_MODE].saved && strcmp(knobs[ADVISOR_MODE].value, "none"))
		write_file(knobs[ADVISOR_MODE].path, "none");	/* fixed pages_to_scan */
	if (read_file(THP_DIR "enabled", buf, sizeof(buf)) > 0) {
		selected(buf, thp, sizeof(thp));
		if (!strcmp(thp, "never"))
			write_file(THP_DIR "enabled", "madvise");
	}
	if (read_file(THP_DIR "shrink_underused", buf, sizeof(buf)) > 0)
		ksft_print_msg("ksmlab: shrink_underused=%ld\n", strtol(buf, NULL, 10));
	ksft_print_msg("ksmlab: thps=%d thp_kib=%zu pages_to_scan=%d sleep_millisecs=%d full_scans=%d\n",
		       NR_THPS, thpsize / 1024, PAGES_TO_SCAN, SLEEP_MILLISECS, FULL_SCANS);

	run_phase(&uzp1);
	if (!uzp1.skip)
		report_phase(&uzp1);
	run_phase(&uzp0);
	if (!uzp0.skip)
		report_phase(&uzp0);
	restore_knobs();

	test_rate(&uzp1);
	test_merge(&uzp0);
	test_zero_counted(&uzp1);

	if (ksft_get_fail_cnt())
		ksft_exit_fail();
	ksft_exit_pass();
}
