/* Sendmail stand-in for bench/bench.py: read stdin to EOF, exit 0.
 *
 * Set in the environment, all optional (without them it only reads and exits 0):
 *   SINK_DELAY_MS  wait this many milliseconds after reading (a latency-bound mail system);
 *   SINK_FAIL_FLAG if the file it names exists when the sink starts, exit 75 (EX_TEMPFAIL,
 *                  "try again later") instead of 0, after the same wait;
 *   SINK_LOG       append one line "<start> <end> <status> <Message-Id>\n" to this file,
 *                  start and end being CLOCK_REALTIME as seconds.nanoseconds, with a single
 *                  O_APPEND write, so that concurrent sinks never interleave lines.
 * Arguments (such as -ti or -f ADDR) are ignored.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 16];

int main(void)
{
    struct timespec start, end;
    clock_gettime(CLOCK_REALTIME, &start);

    const char *log = getenv("SINK_LOG");
    const char *delay = getenv("SINK_DELAY_MS");
    const char *flag = getenv("SINK_FAIL_FLAG");
    int status = flag && access(flag, F_OK) == 0 ? 75 : 0;
    size_t len = 0;
    char scratch[8192];
    for (;;) {
        int keep = log && len < sizeof buf - 1;
        ssize_t n = keep ? read(0, buf + len, sizeof buf - 1 - len) : read(0, scratch, sizeof scratch);
        if (n > 0) {
            if (keep)
                len += (size_t)n;
        } else if (n == 0 || errno != EINTR) {
            break;
        }
    }
    if (delay) {
        long ms = atol(delay);
        struct timespec wait = {ms / 1000, (ms % 1000) * 1000000L};
        while (nanosleep(&wait, &wait) != 0 && errno == EINTR)
            ;
    }
    if (!log)
        return status;

    clock_gettime(CLOCK_REALTIME, &end);
    buf[len] = '\0';
    const char *id = "-";
    size_t idlen = 1;
    char *p = strstr(buf, "Message-Id:");
    if (p) {
        p += strlen("Message-Id:");
        while (*p == ' ' || *p == '\t')
            p++;
        id = p;
        idlen = strcspn(p, "\r\n");
    }
    char line[512];
    int n = snprintf(line, sizeof line, "%lld.%09ld %lld.%09ld %d %.*s\n", (long long)start.tv_sec,
                     start.tv_nsec, (long long)end.tv_sec, end.tv_nsec, status, (int)(idlen < 400 ? idlen : 400),
                     id);
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0 || write(fd, line, (size_t)n) != n)
        return 75;
    close(fd);
    return status;
}
