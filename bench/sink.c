/* Trivial sendmail stand-in for bench/bench.py: read stdin to EOF, exit 0.
 *
 * If the environment variable SINK_LOG names a file, also append one line
 * "<CLOCK_REALTIME at start, seconds.nanoseconds> <Message-Id>\n" to it with a
 * single O_APPEND write, so that concurrent sinks never interleave lines.
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
    struct timespec start;
    clock_gettime(CLOCK_REALTIME, &start);

    const char *log = getenv("SINK_LOG");
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
    if (!log)
        return 0;

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
    int n = snprintf(line, sizeof line, "%lld.%09ld %.*s\n", (long long)start.tv_sec, start.tv_nsec,
                     (int)(idlen < 400 ? idlen : 400), id);
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0 || write(fd, line, (size_t)n) != n)
        return 75;
    close(fd);
    return 0;
}
